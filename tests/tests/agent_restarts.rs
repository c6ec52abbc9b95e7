//! A real pm2 agent across km restarts, counting every line of an app that logs numbered
//! lines: a graceful restart (SIGTERM) loses none, a crash (SIGKILL) at most what km held
//! unwritten (its writer's batch window). km never pings the agent, whose own pings and
//! statuses keep the socket alive: a ping answered on the wrong one of the agent's
//! sockets made it start over and drop what it buffered.
//!
//! Path exercised: the agent runs with the DNS shim, so it reconnects at once (as on a
//! real host), not through the 60 s re-verify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use km_e2e::agent::numbered_lines;
use km_e2e::{Api, LinkOpts, Linked, e2e, linked_with};
use serde_json::json;

/// 20 lines a second: km down for [`DOWN`] leaves them under the agent's buffer of 200
/// packets.
const COUNTER: &str = r#"
let n = 0;
setInterval(() => console.log('counted-line ' + (n++)), 50);
"#;

const DOWN: Duration = Duration::from_secs(8);

/// The numbers of the counter's stored lines, sorted (duplicates kept).
async fn stored(api: &Api, bucket: &str) -> Result<Vec<u64>> {
    numbered_lines(
        api,
        bucket,
        &json!({"app_name": "counter"}),
        "counted-line ",
    )
    .await
}

/// The lines missing between the first and the last stored, and the duplicates.
fn gaps(numbers: &[u64]) -> (Vec<u64>, usize) {
    let mut missing = Vec::new();
    let mut duplicates = 0;
    for pair in numbers.windows(2) {
        match pair[1] - pair[0] {
            0 => duplicates += 1,
            1 => {}
            _ => missing.extend(pair[0] + 1..pair[1]),
        }
    }
    (missing, duplicates)
}

async fn logging(l: &Linked, method: &str) -> Result<()> {
    let body = json!({"server_name": "web-1", "method_name": method, "app_name": "counter"});
    let r = l.api().trigger_pm2(&l.bucket.id, &body).await?;
    ensure!(r.status == 200, "{method}: HTTP {} {}", r.status, r.text);
    Ok(())
}

/// Streams the counter's lines across `restart` of km, then checks what was stored.
async fn lines_across(restart: &str) -> Result<(Vec<u64>, usize, usize)> {
    let opts = LinkOpts {
        dns_shim: true,
        ..LinkOpts::default()
    };
    let mut l = linked_with("web-1", &[("counter", COUNTER)], opts).await?;
    l.wait_apps(&["counter"], Duration::from_secs(30)).await?;
    logging(&l, "startLogging").await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored(l.api(), &l.bucket.id).await?.len() < 40 {
        ensure!(Instant::now() < deadline, "no lines streamed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    match restart {
        "SIGTERM" => {
            l.km.stop().await?;
        }
        _ => l.km.crash(),
    }
    // Down long enough for the agent's reconnect timers to pile up (it then opens many
    // sockets at once), short enough for its buffer of 200 packets.
    tokio::time::sleep(DOWN).await;
    l.km.restart().await?;
    let back = Instant::now();
    // The agent reconnects and flushes what it buffered; lines flow again.
    let before = stored(l.api(), &l.bucket.id).await?.len();
    while stored(l.api(), &l.bucket.id).await?.len() < before + 60 {
        ensure!(
            back.elapsed() < Duration::from_secs(40),
            "lines did not resume after the restart"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    logging(&l, "stopLogging").await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let numbers = stored(l.api(), &l.bucket.id).await?;
    let (missing, duplicates) = gaps(&numbers);
    let agent_log = l.pm2.agent_log();
    ensure!(
        !agent_log.contains("FATAL EXCEPTION"),
        "the agent crashed:\n{agent_log}"
    );
    eprintln!(
        "{restart}: {} lines stored, {} missing {:?}, {duplicates} duplicated",
        numbers.len(),
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    Ok((numbers, missing.len(), duplicates))
}

#[tokio::test]
async fn a_graceful_restart_of_km_loses_no_line() {
    e2e(async {
        let (numbers, missing, duplicates) = lines_across("SIGTERM").await?;
        ensure!(numbers.len() > 100, "only {} lines", numbers.len());
        ensure!(
            missing == 0 && duplicates == 0,
            "{missing} lines lost, {duplicates} doubled"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_crash_of_km_loses_at_most_its_unwritten_batch() {
    e2e(async {
        let (numbers, missing, duplicates) = lines_across("SIGKILL").await?;
        ensure!(numbers.len() > 100, "only {} lines", numbers.len());
        // The writer holds what it received for up to 100 ms (2 lines at 20 a second),
        // plus what was on the wire when km died.
        ensure!(missing <= 6, "{missing} lines lost");
        ensure!(duplicates == 0, "{duplicates} lines doubled");
        Ok(())
    })
    .await
}
