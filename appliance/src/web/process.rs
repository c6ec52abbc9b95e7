//! The process page: an app on a server with its instances live, charts of every metric,
//! actions and their replies, logs (stored search and live tail), issues, events,
//! transaction routes and profiles.

use askama::Template;
use axum::Form;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::fleet::{ProcessRow, card, one_server};
use super::{Flash, Nav, WebSession, back, error_page, render};
use crate::api::Body;
use crate::api::actions;
use crate::api::insights::{self, Route};
use crate::api::traces::DEFAULT_WINDOW_MS;
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_core::bucket_settings::BucketSettings;
use km_core::fleet::{ProcessStatus, page_path};
use km_core::issues::Issue;
use km_stores::ids::now_ms;
use km_stores::{Bucket, EventKind, EventQuery, MemberRole, RouteLatency, SpanQuery};

/// Rows of each stored list the page shows.
const LIST: u32 = 50;

pub struct ActionView {
    pub name: String,
    pub scoped: bool,
}

pub struct LogLine {
    pub at: i64,
    pub log_type: String,
    pub pm_id: String,
    pub text: String,
}

pub struct EventLine {
    pub at: i64,
    pub kind: String,
    /// The text, cut to [`EVENT_SUMMARY`] characters.
    pub text: String,
    /// The whole text when it was cut (a dependency list, a large payload).
    pub detail: Option<String>,
}

/// Characters of an event shown in the feed; the rest is behind a "details" toggle.
const EVENT_SUMMARY: usize = 120;

impl EventLine {
    fn new(at: i64, kind: String, text: String) -> EventLine {
        match text.char_indices().nth(EVENT_SUMMARY) {
            Some((cut, _)) => EventLine {
                at,
                kind,
                text: format!("{}…", &text[..cut]),
                detail: Some(text),
            },
            None => EventLine {
                at,
                kind,
                text,
                detail: None,
            },
        }
    }
}

pub struct ProfileLine {
    pub at: i64,
    pub kind: String,
    pub uuid: String,
    pub duration: String,
}

#[derive(Template)]
#[template(path = "process.html")]
struct ProcessPage {
    nav: Option<Nav>,
    bucket: Bucket,
    role: MemberRole,
    server: String,
    server_online: bool,
    app: String,
    /// This page's path.
    base: String,
    instances: Vec<ProcessRow>,
    first_pm_id: i64,
    metrics: Vec<String>,
    actions: Vec<ActionView>,
    logs: Vec<LogLine>,
    /// The bucket's agents send their logs all the time: the live tail only shows them.
    collect_logs: bool,
    /// The log explorer on this app and server.
    explorer: String,
    issues: Vec<Issue>,
    events: Vec<EventLine>,
    routes: Vec<Route>,
    /// Routes measured from the app's spans (`--trace`, OTLP) in the last hour.
    span_routes: Vec<RouteLatency>,
    /// The traces page of this app on this server.
    traces: String,
    profiles: Vec<ProfileLine>,
    flash: Flash,
}

#[derive(Deserialize, Default)]
pub struct PageQuery {
    #[serde(flatten)]
    flash: Flash,
}

fn docs(list: Vec<String>) -> Vec<Value> {
    list.iter()
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}

/// A stored document's field as text (a string as is, nothing for null, else its JSON).
pub(super) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

pub async fn page(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, server, app_name)): Path<(String, String, String)>,
    Query(query): Query<PageQuery>,
) -> Response {
    let (access, status) = match one_server(&app, &session, &id, &server).await {
        Ok(found) => found,
        Err(page) => return page,
    };
    let processes: Vec<&ProcessStatus> = (status.data.process.iter())
        .filter(|p| p.name == app_name)
        .collect();
    let mut metrics = vec!["cpu".to_string(), "memory".to_string()];
    let first_pm_id = processes.first().and_then(|p| p.pm_id.as_i64());
    let actions = match processes.first() {
        Some(first) => {
            metrics.extend(first.axm_monitor.keys().cloned());
            (first.axm_actions.iter())
                .filter(|a| !a.action_name.is_empty())
                .map(|a| ActionView {
                    name: a.action_name.clone(),
                    scoped: a.action_type == "scoped",
                })
                .collect()
        }
        None => Vec::new(),
    };
    let scope = EventQuery {
        bucket_id: access.bucket.id.clone(),
        app_name: Some(app_name.clone()),
        server_name: Some(server.clone()),
        limit: LIST,
        ..EventQuery::default()
    };
    let span_scope = SpanQuery {
        bucket_id: access.bucket.id.clone(),
        app_name: Some(app_name.clone()),
        server_name: Some(server.clone()),
        since: now_ms() - DEFAULT_WINDOW_MS,
        limit: LIST,
        ..SpanQuery::default()
    };
    // The page's lists are independent reads: asked at once, not one after another.
    let stored = tokio::try_join!(
        async { Ok(app.events.query(EventKind::Log, &scope).await?) },
        async { Ok(app.events.query(EventKind::Event, &scope).await?) },
        async { Ok(app.events.query(EventKind::ProcessEvent, &scope).await?) },
        async { Ok(app.events.query(EventKind::Profile, &scope).await?) },
        insights::triaged_issues(&app, scope.clone()),
        insights::routes(&app, scope.clone()),
        async { Ok(app.events.route_latencies(&span_scope).await?) },
        async { Ok(BucketSettings::load(app.documents.as_ref(), &access.bucket.id).await?) },
    );
    let (logs, events, process_events, profiles, issues, routes, span_routes, settings) =
        match stored {
            Ok(stored) => stored,
            Err(e) => return error_page(&e),
        };
    let mut event_lines: Vec<EventLine> = docs(events)
        .iter()
        .map(|d| {
            let text = match &d["name"] {
                Value::String(name) => format!("{name} {}", text_of(&d["data"])),
                _ => text_of(&d["data"]),
            };
            EventLine::new(d["at"].as_i64().unwrap_or(0), text_of(&d["type"]), text)
        })
        .chain(docs(process_events).iter().map(|d| {
            let kind = format!("process {}", text_of(&d["event"]));
            let text = format!("pm_id {}", text_of(&d["pm_id"]));
            EventLine::new(d["at"].as_i64().unwrap_or(0), kind, text)
        }))
        .collect();
    event_lines.sort_by_key(|e| std::cmp::Reverse(e.at));
    event_lines.truncate(LIST as usize);
    let flash = query.flash;
    render(&ProcessPage {
        nav: Some(Nav::from(&session)),
        role: access.role,
        server_online: status.online,
        instances: card(&status, now_ms())
            .processes
            .into_iter()
            .filter(|p| p.name == app_name)
            .collect(),
        first_pm_id: first_pm_id.unwrap_or(0),
        metrics,
        actions,
        logs: docs(logs)
            .iter()
            .map(|d| LogLine {
                at: d["at"].as_i64().unwrap_or(0),
                log_type: text_of(&d["log_type"]),
                pm_id: text_of(&d["pm_id"]),
                // The line's own newline: the page ends each line.
                text: text_of(&d["data"])
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            })
            .collect(),
        collect_logs: settings.collect_logs,
        explorer: format!(
            "/buckets/{}/logs?{}",
            access.bucket.id,
            serde_urlencoded::to_string([("server", &server), ("app", &app_name)])
                .unwrap_or_default()
        ),
        issues,
        events: event_lines,
        routes,
        span_routes,
        traces: format!(
            "/buckets/{}/traces?{}",
            access.bucket.id,
            serde_urlencoded::to_string([("app", &app_name), ("server", &server)])
                .unwrap_or_default()
        ),
        profiles: docs(profiles)
            .iter()
            .map(|d| ProfileLine {
                at: d["at"].as_i64().unwrap_or(0),
                kind: text_of(&d["type"]),
                uuid: text_of(&d["uuid"]),
                duration: d["data"]["duration"]
                    .as_i64()
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_default(),
            })
            .collect(),
        base: page_path(&access.bucket.id, &server, &app_name),
        server,
        app: app_name,
        bucket: access.bucket,
        flash,
    })
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
    /// `pm2` (restart, reload, …), `custom` or `scoped`.
    #[serde(default)]
    kind: String,
    #[serde(default)]
    method_name: String,
    #[serde(default)]
    number: String,
    #[serde(default)]
    action_name: String,
    #[serde(default)]
    process_id: String,
    /// Parameters of a custom action, as a JSON object (empty: none).
    #[serde(default)]
    opts: String,
}

/// Runs an action from the page; scripts get JSON (`x-requested-with: fetch`), forms a
/// redirect back with the outcome.
pub async fn action(
    State(app): State<AppState>,
    session: WebSession,
    Path((id, server, app_name)): Path<(String, String, String)>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Some(refused) = session.refuse_forged(&form.csrf) {
        return refused;
    }
    let outcome = async {
        let access = super::buckets::access(&app, &session, &id).await.map_err(|_| ApiError::not_found("no such bucket"))?;
        let state = State(app.clone());
        match form.kind.as_str() {
            "pm2" => {
                let mut v = json!({"server_name": server, "method_name": form.method_name, "app_name": app_name});
                if !form.number.is_empty() {
                    v["number"] = scale_number(&form.number);
                }
                actions::trigger_pm2(state, access, Body(parse(v)?)).await.map(drop)?;
                Ok(json!({"msg": format!("{} sent to {app_name}", form.method_name)}))
            }
            "custom" | "scoped" => {
                let opts: Value = match form.opts.trim() {
                    "" => json!({}),
                    text => serde_json::from_str(text).map_err(|e| ApiError::bad_request(format!("parameters: not JSON ({e})")))?,
                };
                let v = json!({"server_name": server, "app_name": app_name, "action_name": form.action_name, "process_id": form.process_id, "opts": opts});
                let sent = if form.kind == "custom" {
                    actions::trigger(state, access, Body(parse(v)?)).await?
                } else {
                    actions::trigger_scoped(state, access, Body(parse(v)?)).await?
                };
                Ok(json!({"msg": format!("{} sent", form.action_name), "uuid": sent.0["uuid"]}))
            }
            other => Err(ApiError::bad_request(format!("kind: {other:?} is not pm2, custom or scoped"))),
        }
    }
    .await;
    let by_script = headers
        .get("x-requested-with")
        .is_some_and(|v| v == "fetch");
    match (by_script, outcome) {
        (true, Ok(v)) => Json(v).into_response(),
        (true, Err(e)) => e.into_response(),
        (false, outcome) => back(
            &page_path(&id, &server, &app_name),
            outcome.map(|v| v["msg"].as_str().unwrap_or("sent").to_string()),
        ),
    }
}

/// The `number` of a scale form as pm2 reads it: plain digits are a count (a JSON number),
/// anything else stays text, so that "+1" and "-1" add or remove one instance (pm2 takes
/// a number as the count to reach, and Rust's integer parsing would accept "+1" as 1).
fn scale_number(text: &str) -> Value {
    let text = text.trim();
    match text.parse::<u64>() {
        Ok(count) if text.bytes().all(|b| b.is_ascii_digit()) => Value::from(count),
        _ => Value::String(text.to_string()),
    }
}

/// A form built as JSON, read as the API route's body (a bad field is a 400).
pub fn parse<T: serde::de::DeserializeOwned>(v: Value) -> ApiResult<T> {
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_numbers_keep_their_sign_as_text() {
        assert_eq!(scale_number("3"), json!(3));
        assert_eq!(scale_number("+1"), json!("+1"));
        assert_eq!(scale_number("-1"), json!("-1"));
        assert_eq!(scale_number(" 2 "), json!(2));
        assert_eq!(scale_number("two"), json!("two"));
    }
}
