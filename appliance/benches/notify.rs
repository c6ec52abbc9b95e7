//! Wall time of the notifier's pass (every 10 s, on one node) over many buckets on the
//! embedded stores: each bucket with an owner, a server of 4 processes, an alert rule
//! and their metric minutes. The pass reads the channels, the new issues and crashes of
//! the window, the servers' states, the episodes (offline, errored, loops), the
//! revisions, and checks the rules against the minutes.
//! Run: `cargo bench -p km-appliance --bench notify`.

use std::sync::Arc;
use std::time::Instant;

use km_config::{Settings, Values};
use km_stores::ids::{new_object_id, now_ms};
use km_stores::{Bucket, MemberRole, MetricPoint, ServerRecord, User};
use km_workers::alerts::{self, AlertForm};
use km_workers::notify::watch;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const BUCKETS: usize = 200;
const PASSES: usize = 5;

/// The captured full status of a server (4 processes).
fn status() -> String {
    include_str!("../../tests/fixtures/agent-status-sequence.jsonl")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|l| l["frame"]["data"].clone())
        .next()
        .map(|data| json!({ "data": data }).to_string())
        .unwrap_or_default()
}

fn minutes(bucket: &str, now: i64) -> Vec<MetricPoint> {
    let start = now - now.rem_euclid(60_000) - 5 * 60_000;
    let mut out = Vec::new();
    for app in ["api", "worker", "cron", "web"] {
        for m in 0..5 {
            out.push(MetricPoint {
                bucket_id: bucket.into(),
                server_name: "web-1".into(),
                app_name: app.into(),
                pm_id: 0,
                name: "cpu".into(),
                unit: Some("%".into()),
                agg_type: None,
                at: start + m * 60_000,
                avg: 20.0,
                min: 10.0,
                max: 30.0,
                last: 20.0,
                count: 60,
            });
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let settings = Settings::from_values(&Values::with_data_dir(dir.path()))?;
    let (app, _writer) = runtime.block_on(km::server::build_app(
        settings,
        "http://127.0.0.1:8080".into(),
        km_tls::Tls::off(),
        CancellationToken::new(),
    ))?;
    let now = now_ms();
    let status = status();
    let buckets: Vec<Bucket> = runtime.block_on(async {
        let mut buckets = Vec::new();
        for n in 0..BUCKETS {
            let owner = User {
                id: new_object_id(),
                username: format!("owner{n}"),
                email: format!("owner{n}@example.com"),
                password_hash: "x".into(),
                role: "user".into(),
                created_at: now,
                disabled: false,
                reset: None,
            };
            app.documents.insert_user(&owner).await?;
            let bucket = Bucket {
                id: new_object_id(),
                name: format!("bucket {n}"),
                public_id: format!("pub{n}"),
                secret_id: format!("sec{n}"),
                owner: owner.id.clone(),
                created_at: now,
                disabled: false,
            };
            app.documents.insert_bucket(&bucket).await?;
            app.documents
                .set_member(&bucket.id, &owner.id, MemberRole::Owner)
                .await?;
            let server = ServerRecord {
                bucket_id: bucket.id.clone(),
                server_name: "web-1".into(),
                last_update: now,
                status_json: status.clone(),
            };
            app.documents.upsert_servers(&[server]).await?;
            let rule: AlertForm = serde_json::from_value(json!({
                "name": "busy", "type": "metric", "initiator": "cpu",
                "options": {"operator": ">", "threshold": 90, "timerange": 300},
            }))?;
            let rule = rule.create(&bucket.id).map_err(anyhow::Error::msg)?;
            alerts::save(app.documents.as_ref(), &rule).await?;
            app.events
                .append_metrics(Arc::from(minutes(&bucket.id, now)))
                .await?;
            buckets.push(bucket);
        }
        anyhow::Ok(buckets)
    })?;
    let mut spent = Vec::new();
    for pass in 0..PASSES {
        let started = Instant::now();
        runtime.block_on(async {
            for bucket in &buckets {
                let end = now + pass as i64 * 10_000;
                watch::bucket(&app, bucket, end - 10_000..end, true).await?;
            }
            anyhow::Ok(())
        })?;
        spent.push(started.elapsed());
    }
    spent.sort();
    let median = spent[PASSES / 2];
    println!(
        "notify pass over {BUCKETS} buckets (SQLite): median {:.1} ms, {:.0} µs per bucket (passes: {:?})",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e6 / BUCKETS as f64,
        spent
    );
    Ok(())
}
