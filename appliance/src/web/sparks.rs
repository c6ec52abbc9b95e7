//! Sparklines of the overview's apps: each app's CPU and memory over the last hour,
//! summed over its instances and servers, from the stored minutes, drawn as inline SVG
//! (no script), each ending at the value the table shows. Minutes are stored once a
//! minute, so a bucket's steps are read at most every [`KEPT_MS`] per node, whatever the
//! number of watchers refreshing the overview.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use km_core::app::AppState;
use km_stores::ids::now_ms;
use km_stores::{MetricPoint, MetricQuery, StoreResult};

/// How far back the lines reach, and their step.
const WINDOW_MS: i64 = 60 * 60_000;
const STEP_MS: i64 = 5 * 60_000;
/// The drawing's size (the SVG's viewBox; the page sets the size shown).
const WIDTH: f64 = 60.0;
const HEIGHT: f64 = 16.0;
/// How long a bucket's steps are kept before they are read again.
const KEPT_MS: i64 = 15_000;
/// Buckets whose steps are kept; past it the cache starts afresh.
const MAX_CACHED_BUCKETS: usize = 1024;

/// One sparkline: the polyline's points and what it says in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Spark {
    pub points: String,
    pub label: String,
}

/// An app's stored steps (step start, the sum over its instances and servers), oldest
/// first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppSteps {
    pub cpu: Vec<(i64, f64)>,
    pub memory: Vec<(i64, f64)>,
}

/// The stored steps of a bucket's apps, by app, and where their window starts.
pub struct BucketSteps {
    pub since: i64,
    pub apps: HashMap<String, AppSteps>,
}

/// A bucket's steps and when they were read.
type Read = (i64, Arc<BucketSteps>);

/// Each bucket's steps, by bucket.
static CACHE: LazyLock<Mutex<HashMap<String, Read>>> = LazyLock::new(Default::default);

/// The bucket's apps' stored steps, read at most every [`KEPT_MS`].
pub async fn of_bucket(app: &AppState, bucket_id: &str) -> StoreResult<Arc<BucketSteps>> {
    let now = now_ms();
    let cached = CACHE.lock().ok().and_then(|c| c.get(bucket_id).cloned());
    if let Some((read_at, steps)) = cached
        && now - read_at < KEPT_MS
    {
        return Ok(steps);
    }
    let since = now - WINDOW_MS;
    let query = MetricQuery {
        bucket_id: bucket_id.to_string(),
        app_name: None,
        server_name: None,
        since,
        until: None,
        names: vec!["cpu".into(), "memory".into()],
        by_instance: true,
    };
    let points = app.events.metric_histogram(&query, STEP_MS).await?;
    let steps = Arc::new(BucketSteps {
        since,
        apps: summed(&points),
    });
    if let Ok(mut cache) = CACHE.lock() {
        if cache.len() >= MAX_CACHED_BUCKETS {
            cache.clear();
        }
        cache.insert(bucket_id.to_string(), (now, steps.clone()));
    }
    Ok(steps)
}

/// Each app's steps in `points` (each instance's, host series left out), summed.
fn summed(points: &[MetricPoint]) -> HashMap<String, AppSteps> {
    let mut sums: HashMap<(&str, &str), HashMap<i64, f64>> = HashMap::new();
    for p in points.iter().filter(|p| !p.of_host()) {
        let steps = sums.entry((&p.app_name, &p.name)).or_default();
        *steps.entry(p.at).or_default() += p.avg;
    }
    let mut apps: HashMap<String, AppSteps> = HashMap::new();
    for ((app, metric), steps) in sums {
        let mut steps: Vec<(i64, f64)> = steps.into_iter().collect();
        steps.sort_by_key(|&(at, _)| at);
        let app = apps.entry(app.to_string()).or_default();
        match metric {
            "cpu" => app.cpu = steps,
            _ => app.memory = steps,
        }
    }
    apps
}

/// A line of the stored `steps` (each at its start) within the window from `since`,
/// ending at the value `now` (what the table shows next to it); none before a step is
/// stored.
pub fn line(
    steps: &[(i64, f64)],
    (since, now): (i64, f64),
    what: &str,
    words: impl Fn(f64) -> String,
) -> Option<Spark> {
    if steps.is_empty() {
        return None;
    }
    // From the first step stored (an app younger than the window fills the width too).
    let start = steps[0].0.max(since);
    let span_ms = (since + WINDOW_MS - start).max(1) as f64;
    let x_of = |at: i64| ((at - start) as f64 / span_ms).clamp(0.0, 1.0) * WIDTH;
    let mut xy: Vec<(f64, f64)> = (steps.iter()).map(|&(at, v)| (x_of(at), v)).collect();
    xy.push((WIDTH, now));
    let (low, high) = (xy.iter()).fold((f64::MAX, f64::MIN), |(lo, hi), &(_, v)| {
        (lo.min(v), hi.max(v))
    });
    let span = high - low;
    let y_of = |v: f64| match span > 0.0 {
        true => HEIGHT - 1.0 - (v - low) / span * (HEIGHT - 2.0),
        false => HEIGHT / 2.0,
    };
    let points = (xy.iter())
        .map(|&(x, v)| format!("{x:.1},{:.1}", y_of(v)))
        .collect::<Vec<_>>()
        .join(" ");
    Some(Spark {
        points,
        label: format!(
            "{what} over the last hour: {} to {}, {} now",
            words(low),
            words(high),
            words(now)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(app: &str, pm_id: i64, name: &str, at: i64, avg: f64) -> MetricPoint {
        MetricPoint {
            bucket_id: "b".into(),
            server_name: "web-1".into(),
            app_name: app.into(),
            pm_id,
            name: name.into(),
            unit: None,
            agg_type: None,
            at,
            avg,
            min: avg,
            max: avg,
            last: avg,
            count: 1,
        }
    }

    #[test]
    fn instances_are_summed_per_step_and_hosts_left_out() {
        let points = [
            point("api", 0, "cpu", 0, 10.0),
            point("api", 1, "cpu", 0, 20.0),
            point("api", 0, "cpu", STEP_MS, 5.0),
            point("api", 1, "cpu", STEP_MS, 5.0),
            point("", -1, "cpu", 0, 99.0),
            point("cron", 2, "memory", 0, 1024.0),
        ];
        let apps = summed(&points);
        assert_eq!(apps["api"].cpu, vec![(0, 30.0), (STEP_MS, 10.0)]);
        assert!(apps["api"].memory.is_empty());
        assert_eq!(apps["cron"].memory, vec![(0, 1024.0)]);
        assert!(!apps.contains_key(""), "the host series is no app");
    }

    #[test]
    fn a_line_ends_at_the_value_now() {
        let percent = |v: f64| format!("{v:.0}%");
        let steps = [(0, 30.0), (STEP_MS, 10.0)];
        let spark = line(&steps, (0, 40.0), "CPU", percent).unwrap();
        assert_eq!(spark.points, "0.0,5.7 5.0,15.0 60.0,1.0");
        assert_eq!(spark.label, "CPU over the last hour: 10% to 40%, 40% now");
        let flat = line(&[(0, 5.0)], (0, 5.0), "CPU", percent).unwrap();
        assert_eq!(flat.points, "0.0,8.0 60.0,8.0");
        assert_eq!(
            line(&[], (0, 5.0), "CPU", percent),
            None,
            "nothing stored yet"
        );
    }
}
