//! Prometheus scraping km: a real Prometheus (Debian's) scrapes km's own `/metrics` and a
//! bucket's `/api/bucket/:id/metrics` every second with bearer tokens, while a real pm2
//! runs an `@pm2/io` app with a custom metric; the test reads what Prometheus stored.
//! With the roles apart (`KM_E2E_ROLES=apart`) the gateway's `/metrics` joins the roles'.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use km_e2e::{Prometheus, ScrapeJob, e2e, linked};
use serde_json::Value;

const APP: &str = "prom-app";
const APP_SRC: &str = r#"
const io = require('@pm2/io');
io.metric({ name: 'Queue depth' }).set(42);
setInterval(() => {}, 1000);
"#;

/// Polls `promql` until it has a sample; returns them.
async fn samples(prometheus: &Prometheus, promql: &str) -> Result<Vec<(Value, f64)>> {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let found = prometheus.query(promql).await?;
        if !found.is_empty() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            let targets = prometheus.api("targets", &[]).await?;
            bail!("no sample of {promql} within 45 s; targets: {targets}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn prometheus_scrapes_the_appliance_and_a_bucket() {
    e2e(async {
        let l = linked("prom-1", &[(APP, APP_SRC)]).await?;
        let token = l.user.api.token().unwrap_or_default().to_string();
        let target = format!("127.0.0.1:{}", l.km.port());
        let job = |name: &str, path: String| ScrapeJob {
            name: name.into(),
            target: target.clone(),
            path,
            token: token.clone(),
        };
        let prometheus = Prometheus::start(&[
            job("km", "/metrics".into()),
            job("bucket", format!("/api/bucket/{}/metrics", l.bucket.id)),
        ])
        .await?;

        let custom = samples(&prometheus, r#"km_process_metric{metric="Queue depth"}"#).await?;
        let (labels, value) = &custom[0];
        ensure!(
            *value == 42.0
                && labels["app"] == APP
                && labels["server"] == "prom-1"
                && labels["bucket"] == l.bucket.name.as_str()
                && labels["job"] == "bucket",
            "the custom metric as Prometheus stored it: {custom:?}"
        );
        let up = samples(&prometheus, &format!(r#"km_process_up{{app="{APP}"}}"#)).await?;
        ensure!(up[0].1 == 1.0, "km_process_up: {up:?}");
        let server = samples(&prometheus, r#"km_server_up{server="prom-1"}"#).await?;
        ensure!(server[0].1 == 1.0, "km_server_up: {server:?}");
        let memory = samples(&prometheus, r#"km_host_memory_total_bytes"#).await?;
        ensure!(memory[0].1 > 0.0, "km_host_memory_total_bytes: {memory:?}");

        // Summed over the roles (with the roles apart each is labelled with its role).
        let agents = samples(&prometheus, "sum(km_agent_servers)").await?;
        ensure!(agents[0].1 >= 1.0, "km_agent_servers: {agents:?}");
        let statuses = samples(&prometheus, "sum(km_statuses_total)").await?;
        ensure!(statuses[0].1 >= 1.0, "km_statuses_total: {statuses:?}");
        // The events store's time per batch, a histogram (the app's start events).
        let writes = samples(
            &prometheus,
            r#"sum(km_store_write_seconds_count{held="events"})"#,
        )
        .await?;
        ensure!(
            writes[0].1 >= 1.0,
            "km_store_write_seconds_count: {writes:?}"
        );
        let within = samples(
            &prometheus,
            r#"sum(km_store_write_seconds_bucket{held="events",le="+Inf"})"#,
        )
        .await?;
        ensure!(
            within[0].1 == writes[0].1,
            "+Inf bucket {within:?} and count {writes:?}"
        );

        // The documents store and the bus answered each process's ping, timed.
        let stores_up = samples(
            &prometheus,
            r#"min(km_store_up{store="documents"}) * min(km_store_up{store="bus"})"#,
        )
        .await?;
        ensure!(stores_up[0].1 == 1.0, "km_store_up: {stores_up:?}");
        let ping = samples(
            &prometheus,
            r#"max(km_store_ping_seconds{store="documents"})"#,
        )
        .await?;
        ensure!(
            ping[0].1 > 0.0 && ping[0].1 < 2.0,
            "km_store_ping_seconds: {ping:?}"
        );

        // Both targets up, scraped with the OpenMetrics format.
        let targets = prometheus.api("targets", &[]).await?;
        let active = targets["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            active.len() == 2 && active.iter().all(|t| t["health"] == "up"),
            "targets: {targets}"
        );

        // Without a token, or a member's token for another bucket: refused.
        let http = reqwest::Client::new();
        let bare = http.get(format!("{}/metrics", l.km.url())).send().await?;
        ensure!(
            bare.status() == 401,
            "/metrics without a token: {}",
            bare.status()
        );
        let other = l.km.api().register_random().await?;
        let theirs = other
            .api
            .get(&format!("/api/bucket/{}/metrics", l.bucket.id))
            .await?;
        ensure!(
            theirs.status == 404,
            "another user's scrape: {}",
            theirs.status
        );
        let not_admin = other.api.get("/metrics").await?;
        ensure!(
            not_admin.status == 403,
            "/metrics for a user: {}",
            not_admin.status
        );
        Ok(())
    })
    .await
}
