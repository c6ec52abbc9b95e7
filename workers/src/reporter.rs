//! Reports (the seeds' reporter service): a daily and a weekly digest of a bucket —
//! servers and processes, restarts, new issues, the top processes by CPU and memory,
//! alerts fired — with small charts drawn as inline SVG. Members opt in per bucket; the
//! workers mail them after midnight UTC (weekly: on Mondays), once across nodes. The
//! same report is a dashboard page and `GET /api/bucket/:id/reports/:period`, for any
//! end time (`at`).

use std::collections::BTreeMap;
use std::time::Duration;

use askama::Template;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::notify::watch::issues_new_in;
use crate::notify::{Outbox, choices};
use km_core::app::{App, AppState};
use km_core::fleet;
use km_core::schedule;
use km_stores::ids::utc_text;
use km_stores::{Bucket, EventKind, EventQuery, MetricQuery, StoreResult};

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
const TOP: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "daily" => Some(Period::Daily),
            "weekly" => Some(Period::Weekly),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
        }
    }

    fn length(self) -> i64 {
        match self {
            Period::Daily => DAY_MS,
            Period::Weekly => 7 * DAY_MS,
        }
    }

    /// The charts' step: hours of a day, days of a week.
    fn step(self) -> i64 {
        match self {
            Period::Daily => HOUR_MS,
            Period::Weekly => DAY_MS,
        }
    }
}

/// A process's average over the period.
#[derive(Debug, Clone, Serialize)]
pub struct Top {
    pub server: String,
    pub app: String,
    pub value: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IssueSummary {
    pub app: String,
    pub message: String,
    pub count: u64,
}

/// One bar of a chart: the step's start and its value.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub title: String,
    pub unit: String,
    pub points: Vec<(i64, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bucket_id: String,
    pub bucket: String,
    pub period: Period,
    /// `[start, end)` in epoch ms.
    pub start: i64,
    pub end: i64,
    pub servers: usize,
    pub processes: usize,
    pub restarts: u64,
    pub exceptions: u64,
    pub new_issues: usize,
    pub issues: Vec<IssueSummary>,
    pub top_cpu: Vec<Top>,
    pub top_memory: Vec<Top>,
    pub alerts_fired: u64,
    pub charts: Vec<Series>,
    pub link: String,
}

/// The bucket's report for the period that ends at `end`.
pub async fn build(app: &App, bucket: &Bucket, period: Period, end: i64) -> StoreResult<Report> {
    let start = end - period.length();
    let step = period.step();
    let query = |event_type: Option<&str>| EventQuery {
        bucket_id: bucket.id.clone(),
        event_type: event_type.map(str::to_string),
        after: Some(start - 1),
        before: Some(end),
        ..EventQuery::default()
    };
    let counts = |kind, event_type| {
        let q = query(event_type);
        async move { app.events.count_histogram(kind, &q, step).await }
    };
    let restarts = counts(EventKind::ProcessEvent, Some("exit")).await?;
    let exceptions = counts(EventKind::Exception, None).await?;
    let alerts = counts(EventKind::Event, Some("alert_fired")).await?;
    let issues = issues_new_in(app, bucket, start, end).await?;
    let servers: Vec<_> = fleet::servers(app, &bucket.id, None)
        .await
        .into_iter()
        .filter(|s| s.last_update >= start)
        .collect();
    let metrics = MetricQuery {
        bucket_id: bucket.id.clone(),
        since: start,
        ..MetricQuery::default()
    };
    let points: Vec<_> = app
        .events
        .metric_histogram(&metrics, step)
        .await?
        .into_iter()
        .filter(|p| p.at < end && !p.of_host())
        .collect();
    let top = |name: &str| top_processes(points.iter().filter(|p| &*p.name == name));
    let cpu_per_step = mean_per_step(points.iter().filter(|p| &*p.name == "cpu"));
    let total = |steps: &[(i64, u64)]| steps.iter().map(|(_, n)| n).sum::<u64>();
    let bars = |steps: &[(i64, u64)]| steps.iter().map(|&(at, n)| (at, n as f64)).collect();
    Ok(Report {
        bucket_id: bucket.id.clone(),
        bucket: bucket.name.clone(),
        period,
        start,
        end,
        servers: servers.len(),
        processes: servers.iter().map(|s| s.data.process.len()).sum(),
        restarts: total(&restarts),
        exceptions: total(&exceptions),
        new_issues: issues.len(),
        issues: issues
            .iter()
            .take(TOP)
            .map(|i| IssueSummary {
                app: i.app_name.clone().unwrap_or_default(),
                message: i.message.chars().take(200).collect(),
                count: i.count,
            })
            .collect(),
        top_cpu: top("cpu"),
        top_memory: top("memory"),
        alerts_fired: total(&alerts),
        charts: vec![
            Series::of("CPU (average of processes)", "%", cpu_per_step),
            Series::of("Exceptions", "", bars(&exceptions)),
            Series::of("Restarts", "", bars(&restarts)),
        ],
        link: format!("{}/buckets/{}", app.public_url, bucket.id),
    })
}

/// The processes (app on a server) with the highest count-weighted average.
fn top_processes<'a>(points: impl Iterator<Item = &'a km_stores::MetricPoint>) -> Vec<Top> {
    let mut sums: BTreeMap<(&str, &str), (f64, f64)> = BTreeMap::new();
    for p in points {
        let w = f64::from(p.count.max(1));
        let e = sums.entry((&p.server_name, &p.app_name)).or_default();
        e.0 += p.avg * w;
        e.1 += w;
    }
    let mut top: Vec<Top> = sums
        .into_iter()
        .map(|((server, app), (sum, w))| Top {
            server: server.to_string(),
            app: app.to_string(),
            value: sum / w,
        })
        .collect();
    top.sort_by(|a, b| b.value.total_cmp(&a.value));
    top.truncate(TOP);
    top
}

/// The mean over processes of each step's value.
fn mean_per_step<'a>(points: impl Iterator<Item = &'a km_stores::MetricPoint>) -> Vec<(i64, f64)> {
    let mut steps: BTreeMap<i64, (f64, f64)> = BTreeMap::new();
    for p in points {
        let e = steps.entry(p.at).or_default();
        e.0 += p.avg;
        e.1 += 1.0;
    }
    steps
        .into_iter()
        .map(|(at, (sum, n))| (at, sum / n))
        .collect()
}

impl Series {
    fn of(title: &str, unit: &str, points: Vec<(i64, f64)>) -> Series {
        Series {
            title: title.into(),
            unit: unit.into(),
            points,
        }
    }
}

/// A bar chart as SVG (askama escapes the title and unit).
#[derive(Template)]
#[template(path = "mail/chart.svg", escape = "html")]
struct Chart<'a> {
    title: &'a str,
    unit: &'a str,
    max: f64,
    bars: Vec<Bar>,
}

struct Bar {
    x: f64,
    y: f64,
    width: f64,
    height: f64,
}

/// A bar chart of `series` over `[start, end)` in steps of `step` (steps start at
/// multiples of `step`; those without a point are empty bars; the steps `start` and `end`
/// fall in are drawn too), scaled to the largest value.
pub fn svg(series: &Series, start: i64, end: i64, step: i64) -> String {
    const W: f64 = 480.0;
    const H: f64 = 96.0;
    let first = start - start.rem_euclid(step);
    let n = ((end - first + step - 1) / step).max(1);
    let values: BTreeMap<i64, f64> = series.points.iter().copied().collect();
    let max = values.values().copied().fold(0.0_f64, f64::max);
    let bar = W / n as f64;
    let bars = (0..n)
        .map(|i| {
            let v = values.get(&(first + i * step)).copied().unwrap_or(0.0);
            let height = if max > 0.0 { v / max * (H - 4.0) } else { 0.0 };
            Bar {
                x: i as f64 * bar + 1.0,
                y: H - height,
                width: (bar - 2.0).max(1.0),
                height,
            }
        })
        .collect();
    Chart {
        title: &series.title,
        unit: &series.unit,
        max,
        bars,
    }
    .render()
    .unwrap_or_default()
}

/// `YYYY-MM-DD HH:MM` UTC of an epoch ms.
pub fn date_time(ms: i64) -> String {
    utc_text(ms).get(..16).unwrap_or_default().to_string()
}

/// The report as a page fragment and a mail: numbers, tables, charts.
#[derive(Template)]
#[template(path = "mail/report.html")]
pub struct ReportHtml<'a> {
    pub r: &'a Report,
    pub charts: Vec<(String, String)>,
    pub from: String,
    pub to: String,
    /// The mail's footer says why it came.
    pub mailed: bool,
}

impl ReportHtml<'_> {
    /// ` style="…"` in the mail (mail clients need inline styles), nothing on the page
    /// (its stylesheet applies, and its CSP refuses inline styles).
    fn style(&self, css: &str) -> String {
        if self.mailed {
            format!(" style=\"{css}\"")
        } else {
            String::new()
        }
    }
}

#[derive(Template)]
#[template(path = "mail/report.txt")]
struct ReportText<'a> {
    r: &'a Report,
    from: String,
    to: String,
}

impl Report {
    /// The report as a dashboard fragment (`mailed: false`) or a mail's body.
    pub fn html(&self, mailed: bool) -> String {
        let step = self.period.step();
        let charts = self
            .charts
            .iter()
            .map(|s| (s.title.clone(), svg(s, self.start, self.end, step)))
            .collect();
        ReportHtml {
            r: self,
            charts,
            from: date_time(self.start),
            to: date_time(self.end),
            mailed,
        }
        .render()
        .unwrap_or_default()
    }

    fn text(&self) -> String {
        ReportText {
            r: self,
            from: date_time(self.start),
            to: date_time(self.end),
        }
        .render()
        .unwrap_or_default()
    }
}

/// Queues the report of `bucket` for the period ending at `end` to the members who chose
/// it; answers how many. Without SMTP_HOST nothing is built or queued.
pub async fn send(app: &App, bucket: &Bucket, period: Period, end: i64) -> StoreResult<usize> {
    if app.settings.smtp.is_none() {
        return Ok(0);
    }
    let chosen = choices::all(app.documents.as_ref(), &bucket.id).await?;
    let recipients: Vec<String> = app
        .documents
        .bucket_members(&bucket.id)
        .await?
        .into_iter()
        .filter(|m| chosen.get(&m.user_id).is_some_and(|c| c.wants(period)))
        .map(|m| m.email)
        .collect();
    if recipients.is_empty() {
        return Ok(0);
    }
    let report = build(app, bucket, period, end).await?;
    let subject = format!(
        "[{}] {} report: {} servers, {} restarts, {} new issues",
        bucket.name,
        if period == Period::Daily {
            "Daily"
        } else {
            "Weekly"
        },
        report.servers,
        report.restarts,
        report.new_issues
    );
    let outbox = Outbox::of(app, bucket).await?;
    let event = crate::notify::Event {
        kind: if period == Period::Daily {
            "report_daily"
        } else {
            "report_weekly"
        },
        subject,
        text: report.text(),
        html: format!(
            "<!doctype html>\n<html><body>{}</body></html>",
            report.html(true)
        ),
        count: 1,
        items: vec![json!(report)],
        link: report.link.clone(),
    };
    let n = recipients.len();
    outbox.mail(event, recipients).await?;
    Ok(n)
}

/// The workers' schedule: each day's reports once across nodes, just after midnight UTC;
/// the weekly ones on Mondays.
pub async fn run(app: AppState) {
    let (documents, shutdown) = (app.documents.clone(), app.shutdown.clone());
    schedule::every(
        documents,
        shutdown,
        "reports",
        Duration::from_millis(DAY_MS as u64),
        |day| send_all(&app, day * DAY_MS),
    )
    .await;
}

/// Every bucket's reports for the day that ends at `midnight`.
pub async fn send_all(app: &App, midnight: i64) {
    // 1970-01-01 was a Thursday: Mondays are days 4 mod 7.
    let monday = (midnight / DAY_MS).rem_euclid(7) == 4;
    let buckets = match app.documents.all_buckets().await {
        Ok(buckets) => buckets,
        Err(e) => {
            tracing::warn!(error = %e, "reports: cannot list the buckets");
            return;
        }
    };
    for bucket in buckets {
        for period in [Period::Daily, Period::Weekly] {
            if period == Period::Weekly && !monday {
                continue;
            }
            match send(app, &bucket, period, midnight).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(bucket = %bucket.id, period = period.as_str(), recipients = n, "report queued")
                }
                Err(e) => tracing::warn!(bucket = %bucket.id, error = %e, "report not made"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_mondays() {
        assert_eq!(date_time(0), "1970-01-01 00:00");
        // 2026-11-23 is a Monday.
        let monday = 1_795_392_000_000;
        assert_eq!(date_time(monday + 3_723_000), "2026-11-23 01:02");
        assert_eq!((monday / DAY_MS).rem_euclid(7), 4);
        assert_eq!(date_time(951_782_400_000), "2000-02-29 00:00");
    }

    #[test]
    fn charts_have_a_bar_per_step_scaled_to_the_largest() {
        let series = Series::of("Restarts <x>", "", vec![(0, 2.0), (2 * HOUR_MS, 4.0)]);
        let day = svg(&series, 0, DAY_MS, HOUR_MS);
        assert_eq!(day.matches("<rect ").count(), 1 + 24);
        assert!(day.contains("height=\"92.0\""), "{day}");
        assert!(day.contains("height=\"46.0\""), "{day}");
        assert!(day.contains("Restarts &#60;x&#62;") && day.contains("max 4.0"));
        // A window off the steps: the step of now has its bar.
        let now = DAY_MS + HOUR_MS / 2;
        let recent = Series::of("Restarts", "", vec![(DAY_MS, 1.0)]);
        let svg = svg(&recent, now - DAY_MS, now, HOUR_MS);
        assert_eq!(svg.matches("<rect ").count(), 1 + 25);
        assert!(
            svg.contains("height=\"92.0\""),
            "the last step is drawn: {svg}"
        );
    }
}
