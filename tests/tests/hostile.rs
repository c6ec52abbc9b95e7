//! Hostile agents: every frame an agent sends may be written by an attacker holding its
//! bucket's keys. Each test runs one attack against a real km while another tenant keeps
//! logging numbered lines; km must refuse the attack clearly (counted in `/healthz`), stay
//! alive and healthy, and the other tenant must lose nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use km_e2e::agent::{Incoming, LoggingTenant, SimAgent, log_line, status};
use km_e2e::{Api, Bucket, Km, e2e, now_ms};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

const SECOND: Duration = Duration::from_secs(1);
/// `/healthz` answers within this while an attack goes on (debug builds on a 2-core
/// machine running two tests at once; an answer normally takes milliseconds).
const HEALTH_WITHIN: Duration = Duration::from_secs(3);

/// A km with two tenants: one that keeps logging, and the attacker's bucket.
struct Arena {
    started: Instant,
    km: Km,
    api: Api,
    tenant: LoggingTenant,
    hostile: Bucket,
}

impl Arena {
    async fn start() -> Result<Arena> {
        let km = Km::start().await?;
        let api = km.api().register_random().await?.api;
        let steady = api.create_bucket("steady").await?;
        let hostile = api.create_bucket("hostile").await?;
        let tenant = LoggingTenant::start(&km.url(), steady, "steady-1", 50).await?;
        Ok(Arena {
            started: Instant::now(),
            km,
            api,
            tenant,
            hostile,
        })
    }

    async fn agent(&self, server: &str) -> Result<SimAgent> {
        let mut agent = SimAgent::connect(&self.km.url(), &self.hostile, server).await?;
        agent.send("status", &status(server, 4)).await?;
        Ok(agent)
    }

    /// `/healthz`, answered within [`HEALTH_WITHIN`].
    async fn health(&self) -> Result<Value> {
        let start = Instant::now();
        let health = self.api.get_ok("/healthz").await?;
        let took = start.elapsed();
        ensure!(took < HEALTH_WITHIN, "/healthz took {took:?}");
        Ok(health)
    }

    /// km is alive and healthy, answers the attacker's bucket's status, and the other
    /// tenant lost no line. Returns `/healthz`.
    async fn finish(mut self) -> Result<Value> {
        // The tenant logs for a few seconds at least, whatever the attack took.
        tokio::time::sleep((3 * SECOND).saturating_sub(self.started.elapsed())).await;
        ensure!(self.km.alive(), "km died:\n{}", self.km.log());
        let health = self.health().await?;
        ensure!(health["status"] == "ok", "km not healthy: {health}");
        self.api
            .status(&self.hostile.id)
            .await
            .context("the attacker's bucket's status")?;
        let lines = self.tenant.stop_and_check(&self.api).await?;
        ensure!(lines > 50, "the tenant logged only {lines} lines");
        ensure!(self.km.alive(), "km died:\n{}", self.km.log());
        Ok(health)
    }
}

fn counter(health: &Value, name: &str) -> u64 {
    health["ingest"][name].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_patch_copying_the_status_into_itself_is_refused() {
    e2e(async {
        let arena = Arena::start().await?;
        let mut agent = arena.agent("copier").await?;
        // Twenty copies of the whole status, each into the status: 2^20 times its size.
        let ops: Vec<Value> = (0..20)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/x{i}")}))
            .collect();
        agent.send("status:patch", &Value::Array(ops)).await?;
        agent.expect_channel("status:resend", 5 * SECOND).await?;
        // Copies between siblings grow it too, until the budget stops them.
        let mut ops = vec![
            json!({"op": "copy", "from": "/data", "path": "/a"}),
            json!({"op": "copy", "from": "/data", "path": "/b"}),
        ];
        for i in 0..60 {
            let (from, to) = if i % 2 == 0 {
                ("/a", "/b")
            } else {
                ("/b", "/a")
            };
            ops.push(json!({"op": "copy", "from": from, "path": format!("{to}/n{i}")}));
        }
        agent.send("status:patch", &Value::Array(ops)).await?;
        agent.expect_channel("status:resend", 5 * SECOND).await?;
        let health = arena.health().await?;
        ensure!(counter(&health, "patches_refused") >= 2, "{health}");
        ensure!(
            arena.km.peak_rss() < 400 << 20,
            "km peaked at {} bytes",
            arena.km.peak_rss()
        );
        drop(agent);
        arena.finish().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn patches_nesting_deeper_and_deeper_are_refused() {
    e2e(async {
        let arena = Arena::start().await?;
        let mut agent = arena.agent("nester").await?;
        let nested = (0..120).fold(json!(1), |v, _| json!({ "n": v }));
        let mut path = "/deep".to_string();
        for _ in 0..300 {
            agent
                .send(
                    "status:patch",
                    &json!([{"op": "add", "path": path, "value": nested}]),
                )
                .await?;
            path.push_str(&"/n".repeat(120));
        }
        // Every one of them is over the depth budget and counted; the agent is asked for a
        // full status (resends beyond the socket's outbox of 64 are dropped: one is enough).
        agent.expect_channel("status:resend", 5 * SECOND).await?;
        let deadline = Instant::now() + 20 * SECOND;
        while counter(&arena.health().await?, "patches_refused") < 300 {
            ensure!(
                Instant::now() < deadline,
                "not every patch was refused: {}",
                arena.health().await?
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Closing the socket saves the server's state (it once overflowed the stack).
        drop(agent);
        tokio::time::sleep(SECOND).await;
        let servers = arena.api.status(&arena.hostile.id).await?;
        ensure!(
            servers
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["server_name"] == "nester")),
            "{servers}"
        );
        let health = arena.finish().await?;
        ensure!(counter(&health, "patches_refused") >= 300, "{health}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_status_of_thousands_of_processes_is_refused_without_stalling_others() {
    e2e(async {
        let arena = Arena::start().await?;
        // At the budget: taken, and quickly (it was quadratic).
        let mut big = arena.agent("big").await?;
        for _ in 0..5 {
            big.send("status", &status("big", 2_000)).await?;
        }
        let start = Instant::now();
        arena
            .api
            .wait_server(
                &arena.hostile.id,
                "big",
                "2,000 processes",
                20 * SECOND,
                |s| (s["data"]["process"].as_array()?.len() == 2_000).then_some(()),
            )
            .await?;
        arena.health().await?;
        ensure!(
            start.elapsed() < 10 * SECOND,
            "2,000 processes took {:?}",
            start.elapsed()
        );
        // Over it: the socket is closed with the reason, and nobody else waits.
        let mut huge = arena.agent("huge").await?;
        huge.send("status", &status("huge", 16_000)).await?;
        let probe = async {
            for _ in 0..10 {
                arena.health().await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        };
        let (close, probed) = tokio::join!(huge.expect_close(20 * SECOND), probe);
        probed?;
        let (code, reason) = close?.context("closed without a close frame")?;
        ensure!(code == 1008, "close code {code}: {reason}");
        ensure!(reason.contains("16000 processes"), "reason: {reason}");
        let health = arena.finish().await?;
        ensure!(counter(&health, "statuses_refused") == 1, "{health}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_frame_over_the_limit_is_closed_with_1009() {
    e2e(async {
        let arena = Arena::start().await?;
        let mut agent = arena.agent("hoarder").await?;
        let frame = format!(
            r#"{{"channel":"profilings","payload":{{"data":"{}"}}}}"#,
            "x".repeat(250 << 20)
        );
        // km closes as soon as the frame's header says how long it is.
        let _ = agent.send_text(frame).await;
        let (code, reason) = agent
            .expect_close(20 * SECOND)
            .await?
            .context("closed without a close frame")?;
        ensure!(code == 1009, "close code {code}: {reason}");
        ensure!(
            arena.km.peak_rss() < 200 << 20,
            "km peaked at {} bytes",
            arena.km.peak_rss()
        );
        let health = arena.finish().await?;
        ensure!(counter(&health, "frames_too_large") == 1, "{health}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn large_frames_at_once_share_one_budget() {
    e2e(async {
        let arena = Arena::start().await?;
        // Three agents each start a 100 MB frame (a fragment of 100 MB that is not the
        // last) at once: two fit in the node's in-flight budget of 256 MB, the third
        // waits for room, then is closed with 1013 while the two still hold theirs.
        let head = format!(
            r#"{{"channel":"profilings","payload":{{"data":"{}"#,
            "x".repeat(100 << 20)
        );
        let mut tasks = Vec::new();
        for i in 0..3 {
            let mut agent = arena.agent(&format!("big-{i}")).await?;
            let fragment =
                Frame::message(head.clone().into_bytes(), OpCode::Data(Data::Text), false);
            tasks.push(tokio::spawn(async move {
                let sent = agent.send_frame(fragment).await;
                let heard = agent.next(15 * SECOND).await.ok();
                (agent, sent.is_ok(), heard)
            }));
        }
        let mut holders = Vec::new();
        let mut refused = 0;
        for task in tasks {
            let (agent, sent, heard) = task.await?;
            match heard {
                None if sent => holders.push(agent),
                // Its send was still held back when km closed: the close frame may not
                // reach it (km's log and counter say why).
                Some(Incoming::Closed(Some((1013, _)) | None)) => refused += 1,
                other => anyhow::bail!("{}: sent {sent}, then {other:?}", agent.server),
            }
        }
        ensure!(
            refused == 1 && holders.len() == 2,
            "{refused} refused, {} holders",
            holders.len()
        );
        ensure!(
            arena.km.log().contains("try again later"),
            "no reason logged"
        );
        // The two holders finish their frames: taken.
        for agent in &mut holders {
            let tail = Frame::message(br#""}}"#.to_vec(), OpCode::Data(Data::Continue), true);
            agent.send_frame(tail).await?;
        }
        // km handles and writes both (the peak below includes that).
        tokio::time::sleep(3 * SECOND).await;
        let peak = arena.km.peak_rss();
        ensure!(peak < 1200 << 20, "km peaked at {peak} bytes");
        let health = arena.health().await?;
        ensure!(counter(&health, "frames_refused_busy") == 1, "{health}");
        drop(holders);
        arena.finish().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn identical_log_lines_in_the_same_millisecond_are_all_kept() {
    e2e(async {
        let arena = Arena::start().await?;
        let mut agent = arena.agent("twins").await?;
        let at = now_ms();
        for _ in 0..3 {
            agent
                .send("logs", &log_line("twin", "twins", 7, at))
                .await?;
        }
        let filter = json!({"server_name": "twins"});
        let deadline = Instant::now() + 10 * SECOND;
        loop {
            let lines = arena.api.data(&arena.hostile.id, "logs", &filter).await?;
            let n = lines.as_array().map_or(0, Vec::len);
            if n == 3 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "{n} of 3 identical lines stored: {lines}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        drop(agent);
        arena.finish().await?;
        Ok(())
    })
    .await
}
