//! Two km nodes on the scale-out stores (MongoDB, Elasticsearch, Redis), both running the
//! workers: each scheduled job's period runs on exactly one of them, and a crashing app
//! of a server linked to one node is mailed once as a new issue (and once as a loop).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use km_e2e::{Km, Pm2, ScaleOut, Smtp, e2e, strip_ansi, unique};
use serde_json::json;

/// `job -> slots` this node ran, from its log (`km_core::schedule` at debug).
fn runs(log: &str) -> BTreeMap<String, BTreeSet<i64>> {
    let mut out: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for line in strip_ansi(log)
        .lines()
        .filter(|l| l.contains("period run here"))
    {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').to_string())
        };
        if let (Some(job), Some(slot)) = (field("job"), field("slot").and_then(|s| s.parse().ok()))
        {
            out.entry(job).or_default().insert(slot);
        }
    }
    out
}

#[tokio::test]
async fn two_nodes_run_each_scheduled_period_once() {
    e2e(async {
        let stores = ScaleOut::start()?;
        let smtp = Smtp::start("plain", "", "")?;
        let mut env = stores.env();
        env.extend([
            (
                "KM_LOG".to_string(),
                "info,km_core::schedule=debug".to_string(),
            ),
            ("SMTP_HOST".into(), format!("127.0.0.1:{}", smtp.port())),
            ("SMTP_TLS".into(), "none".into()),
            ("SMTP_SENDER".into(), "km@example.com".into()),
        ]);
        let a = Km::start_with(env.clone()).await?;
        let b = Km::start_with(env).await?;
        let started = Instant::now();
        let user = a.api().register_random().await?;
        let bucket = user.api.create_bucket(&unique("bucket-")).await?;
        let pm2 = Pm2::new(&a.url())?;
        let crasher = "setTimeout(() => { throw new Error('cluster-boom') }, 1000);";
        pm2.start_app("crasher", crasher).await?;
        let (code, out) = pm2
            .link(&bucket.secret_id, &bucket.public_id, "node-a-1")
            .await?;
        ensure!(code == 0, "pm2 link: {out}");

        // One mail for the new issue, though both nodes look every 10 s.
        let deadline = Instant::now() + Duration::from_secs(60);
        while smtp.mails()?.is_empty() {
            ensure!(Instant::now() < deadline, "no mail within 60 s");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let wait = Duration::from_secs(45).saturating_sub(started.elapsed());
        tokio::time::sleep(wait.max(Duration::from_secs(20))).await;
        // The app crashes every second: the loop is told too, each kind once.
        let listed = user
            .api
            .post_ok(
                &format!("/api/bucket/{}/data/notifications", bucket.id),
                &json!({}),
            )
            .await?;
        let mut kinds: Vec<&str> = listed
            .as_array()
            .context("list")?
            .iter()
            .filter_map(|n| n["kind"].as_str())
            .collect();
        kinds.sort_unstable();
        ensure!(kinds == ["new_issue", "restart_loop"], "listed: {listed}");
        let mails = smtp.mails()?;
        ensure!(
            mails.len() == kinds.len(),
            "{} mails for {kinds:?}",
            mails.len()
        );

        let (on_a, on_b) = (runs(&a.log()), runs(&b.log()));
        for job in ["notify", "retention", "reports"] {
            let (sa, sb) = (
                on_a.get(job).cloned().unwrap_or_default(),
                on_b.get(job).cloned().unwrap_or_default(),
            );
            let twice: Vec<_> = sa.intersection(&sb).collect();
            ensure!(
                twice.is_empty(),
                "{job}: periods run on both nodes: {twice:?}"
            );
            let all: BTreeSet<i64> = sa.union(&sb).copied().collect();
            ensure!(!all.is_empty(), "{job}: never run");
            if job == "notify" {
                // Every 10-s period since both started, with none skipped.
                let (first, last) = (*all.first().context("first")?, *all.last().context("last")?);
                ensure!(
                    all.len() as i64 == last - first + 1 && all.len() >= 3,
                    "notify periods: {all:?}"
                );
            }
            eprintln!(
                "cluster: {job}: node a ran {}, node b ran {} periods",
                sa.len(),
                sb.len()
            );
        }
        let _ = pm2.run(&["kill"]).await;
        Ok(())
    })
    .await;
}
