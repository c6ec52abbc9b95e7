//! Every route of km, and the router that puts every role on one port like the original
//! nginx did (or one role on its own port): the API, the auth role, the dashboard, the
//! two websockets, the gateway's front door, `/healthz`, security headers.

use axum::http::HeaderValue;
use axum::http::StatusCode;
use axum::http::header::{
    CONNECTION, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::api::{actions, alerts, buckets, data, insights, oauth, team, traces};
use crate::role::Role;
use crate::{gateway, interactor, metrics, realtime, web};
use km_core::app::{AppState, Ping};

/// Every route of `km serve`: every role on one port.
pub fn router(app: AppState) -> Router {
    let front = gateway::Front::in_process(app.tls.clone(), &app.settings);
    let routes = interactor_routes()
        .merge(realtime_routes())
        .merge(auth_routes())
        .merge(api_routes())
        .merge(front.routes());
    finish(routes, app, None)
}

/// The routes of one role running apart (`km serve --role ...`), each with `/healthz`.
pub fn role_router(app: AppState, role: Role) -> Router {
    let routes = match role {
        Role::Interactor => interactor_routes(),
        Role::Realtime => realtime_routes(),
        Role::Auth => auth_routes(),
        Role::Api => api_routes(),
        // Their /healthz and /metrics only (the gateway's front door is its own router).
        Role::Gateway | Role::Workers => Router::new(),
    };
    finish(routes, app, Some(role))
}

/// `role`: the role this process runs alone, named in its `/healthz` (the gateway checks
/// that each port it forwards to is the role it expects).
fn finish(routes: Router<AppState>, app: AppState, role: Option<Role>) -> Router {
    let routes = routes
        .route("/healthz", get(move |state| health(state, role)))
        .route("/metrics", get(metrics::appliance))
        .fallback(web::not_found);
    with_security_headers(routes).with_state(app)
}

/// Agents' websocket.
fn interactor_routes() -> Router<AppState> {
    Router::new().route("/interaction", get(interactor::interaction))
}

/// Browsers' and `@pm2/js-api`'s websocket.
fn realtime_routes() -> Router<AppState> {
    Router::new().route("/primus", get(realtime::primus))
}

/// Accounts and tokens.
fn auth_routes() -> Router<AppState> {
    Router::new()
        .route(
            "/api/oauth/register",
            get(oauth::register).post(oauth::register),
        )
        .route("/api/oauth/token", post(oauth::token))
        .route("/api/oauth/revoke", post(oauth::revoke))
}

/// The HTTP API and the dashboard.
fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/node/verifyPM2", post(interactor::verify))
        .route("/api/users/isLogged", get(oauth::is_logged))
        .route("/api/bucket", get(buckets::list))
        .route("/api/bucket/", get(buckets::list))
        .route("/api/bucket/create_classic", post(buckets::create))
        .route(
            "/api/bucket/{id}",
            get(buckets::retrieve)
                .put(buckets::update)
                .delete(buckets::destroy),
        )
        .route("/api/bucket/{id}/users_authorized", get(buckets::members))
        .route("/api/bucket/{id}/current_role", get(buckets::current_role))
        .route("/api/bucket/{id}/usage", get(buckets::usage))
        .route("/api/bucket/{id}/metrics", get(metrics::bucket))
        .route("/api/bucket/{id}/manage_notif", post(buckets::manage_notif))
        .route(
            "/api/bucket/{id}/alerts",
            get(alerts::list).post(alerts::create),
        )
        .route("/api/bucket/{id}/alerts/", get(alerts::list))
        .route("/api/bucket/{id}/alerts/channels", get(alerts::channels))
        .route(
            "/api/bucket/{id}/alerts/update",
            post(alerts::update_triggers),
        )
        .route(
            "/api/bucket/{id}/alerts/updateSlack",
            post(alerts::update_slack),
        )
        .route(
            "/api/bucket/{id}/alerts/updateWebhooks",
            post(alerts::update_webhooks),
        )
        .route(
            "/api/bucket/{id}/alerts/{alert}",
            get(alerts::retrieve)
                .put(alerts::update)
                .delete(alerts::delete),
        )
        .route(
            "/api/bucket/{id}/alerts/{alert}/sample",
            post(alerts::sample),
        )
        .route(
            "/api/bucket/{id}/reports/choice",
            post(alerts::report_choice),
        )
        .route("/api/bucket/{id}/reports/{period}", get(alerts::report))
        .route(
            "/api/bucket/{id}/reports/{period}/send",
            post(alerts::send_report),
        )
        .route("/api/bucket/{id}/add_user", post(buckets::add_member))
        .route(
            "/api/bucket/{id}/promote_user",
            post(buckets::set_member_role),
        )
        .route("/api/bucket/{id}/remove_user", post(buckets::remove_member))
        .route(
            "/api/bucket/{id}/invitations",
            get(team::invitations).post(team::invite),
        )
        .route(
            "/api/bucket/{id}/invitations/{invitation}",
            delete(team::revoke_invitation),
        )
        .route("/api/bucket/{id}/transfer_ownership", post(team::transfer))
        .route("/api/bucket/{id}/meta_servers", get(buckets::servers))
        .route(
            "/api/bucket/{id}/data/deleteServer",
            post(buckets::delete_server),
        )
        .route("/api/bucket/{id}/data/status", get(data::status))
        .route(
            "/api/bucket/{id}/data/notifications",
            post(data::notifications),
        )
        .route("/api/bucket/{id}/data/logs", post(data::logs))
        .route("/api/bucket/{id}/data/exceptions", post(data::exceptions))
        .route("/api/bucket/{id}/data/events", post(data::events))
        .route(
            "/api/bucket/{id}/data/processEvents",
            post(data::process_events),
        )
        .route(
            "/api/bucket/{id}/data/transactions",
            post(data::transactions),
        )
        .route("/api/bucket/{id}/data/profilings", post(data::profilings))
        .route(
            "/api/bucket/{id}/data/metrics/histogram",
            post(data::metrics_histogram),
        )
        .route(
            "/api/bucket/{id}/data/metrics/aggregations",
            post(data::metrics_aggregations),
        )
        .route(
            "/api/bucket/{id}/data/logs/histogram",
            post(insights::logs_histogram),
        )
        .route(
            "/api/bucket/{id}/data/exceptions/summary",
            get(insights::issues_summary),
        )
        .route(
            "/api/bucket/{id}/data/issues/list",
            post(insights::issues_list),
        )
        .route(
            "/api/bucket/{id}/data/issues/occurrences/{identifier}",
            get(insights::issue_occurrences),
        )
        .route(
            "/api/bucket/{id}/data/issues/{identifier}",
            delete(insights::issue_delete).put(insights::issue_set_state),
        )
        .route(
            "/api/bucket/{id}/data/processEvents/deployments",
            post(insights::deployments),
        )
        .route(
            "/api/bucket/{id}/data/transactions/v2/summary",
            post(insights::transactions_summary),
        )
        .route(
            "/api/bucket/{id}/data/transactions/v2/histogram",
            post(insights::transactions_histogram),
        )
        .route(
            "/api/bucket/{id}/data/profilings/{filename}",
            get(data::profiling).delete(data::profiling_delete),
        )
        .route(
            "/api/bucket/{id}/data/profilings/{filename}/download",
            get(data::profiling_download),
        )
        .route(
            "/api/bucket/{id}/actions/triggerPM2",
            post(actions::trigger_pm2),
        )
        .route("/api/bucket/{id}/actions/trigger", post(actions::trigger))
        .route(
            "/api/bucket/{id}/actions/triggerScopedAction",
            post(actions::trigger_scoped),
        )
        .route(
            "/api/bucket/{id}/data/issues/search",
            post(insights::issues_list),
        )
        .route(
            "/api/bucket/{id}/data/issues/histogram",
            post(insights::issues_histogram),
        )
        .route(
            "/api/bucket/{id}/data/issues",
            delete(insights::issues_delete_all),
        )
        .route(
            "/api/bucket/{id}/data/exceptions/delete_all",
            post(insights::exceptions_delete_all),
        )
        .route(
            "/api/bucket/{id}/data/events/stats",
            post(insights::events_histogram),
        )
        .route("/api/bucket/{id}/traces", get(traces::list))
        .route("/api/bucket/{id}/traces/routes", get(traces::routes))
        .route("/api/bucket/{id}/traces/{trace}", get(traces::trace))
        .route("/api/v2/spans", post(interactor::intake::zipkin))
        .route("/v1/traces", post(interactor::intake::otlp))
        .route(
            "/api/bucket/{id}/data/events/delete_all",
            delete(insights::events_delete_all),
        )
        .merge(web::routes())
}

/// The OpenAPI 3.1 description of this API (`assets/openapi.json`, written by hand).
const OPENAPI: &str = include_str!("../assets/openapi.json");

/// `GET /api/openapi.json`.
async fn openapi() -> impl axum::response::IntoResponse {
    ([(CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Headers every answer carries: pages run only this site's scripts, are never framed,
/// and content types are not guessed.
fn with_security_headers(router: Router<AppState>) -> Router<AppState> {
    const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                       frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'";
    [
        (CONTENT_SECURITY_POLICY, CSP),
        (X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (REFERRER_POLICY, "same-origin"),
    ]
    .into_iter()
    .fold(closing_after_too_large(router), |router, (name, value)| {
        router.layer(SetResponseHeaderLayer::if_not_present(
            name,
            HeaderValue::from_static(value),
        ))
    })
}

/// A 413 leaves the request's body unread, so the connection closes after the answer:
/// the answer says so (`Connection: close`), or a client would send its next request on
/// a connection about to close ("connection closed before message completed").
pub fn closing_after_too_large<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    router.layer(axum::middleware::map_response(
        |mut response: axum::response::Response| async move {
            if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
                (response.headers_mut()).insert(CONNECTION, HeaderValue::from_static("close"));
            }
            response
        },
    ))
}

/// `GET /healthz`: ready (200 while the process serves), with each store's state
/// (`status: degraded` when one is down) and the numbers an operator watches.
async fn health(
    axum::extract::State(app): axum::extract::State<AppState>,
    role: Option<Role>,
) -> Json<serde_json::Value> {
    let writer = &app.ingest.writer.stats;
    let [documents, bus] = app.ping_stores().await;
    let events = writer.refusal();
    let store = |kind: &str, error: Option<String>| json!({ "kind": kind, "up": error.is_none(), "error": error });
    let pinged = |p: Ping| store(p.kind, p.answer.err().map(|e| e.to_string()));
    let degraded = documents.answer.is_err() || events.is_some() || bus.answer.is_err();
    Json(json!({
        "status": if degraded { "degraded" } else { "ok" },
        "version": env!("CARGO_PKG_VERSION"),
        "role": role.map(Role::name),
        "stores": {
            "documents": pinged(documents),
            "events": store(app.events.kind(), events),
            "bus": pinged(bus),
        },
        "agents": { "servers": app.sessions.all().len(), "sockets": app.sessions.sockets_open() },
        "ingest": app.ingest.counters,
        "in_flight_bytes": app.ingest.in_flight.used(),
        "shared_names": km_ingest::tree::Names::count(),
        "metric_shapes": km_ingest::process::Shape::count(),
        "tls": app.tls.health(),
        "backup": app.settings.backups.as_ref().map(|b| km_backup::Outcome::read(&b.dir)),
        "writer": {
            "events_written": writer.events_written,
            "metric_points_written": writer.metric_points_written,
            "batches_written": writer.batches_written,
            "dropped": writer.dropped,
            "queued_points": writer.queued_points(),
            "write_retries": writer.write_retries,
            "write_errors": writer.write_errors,
        },
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// `(path, methods)` of every `.route("…", …)` of the router, read from this file.
    fn routes_in_source() -> Vec<(String, Vec<&'static str>)> {
        let src = include_str!("routes.rs");
        // Only the code above the tests (their own text mentions `.route(` too).
        let src = src.split("#[cfg(test)]").next().unwrap_or(src);
        let mut routes = Vec::new();
        for chunk in src.split(".route(").skip(1) {
            let Some(rest) = chunk.trim_start().strip_prefix('"') else {
                continue;
            };
            let Some((path, rest)) = rest.split_once('"') else {
                continue;
            };
            // The route's arguments end at the parenthesis closing `.route(`.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            let handlers = &rest[..end];
            let methods = ["get", "post", "put", "delete", "patch"]
                .into_iter()
                .filter(|m| {
                    handlers.match_indices(&format!("{m}(")).any(|(i, _)| {
                        !handlers[..i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                    })
                })
                .collect();
            routes.push((path.to_string(), methods));
        }
        routes
    }

    #[test]
    fn openapi_document_covers_every_api_route() {
        let doc: Value = serde_json::from_str(super::OPENAPI).expect("openapi.json is not JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let paths = doc["paths"].as_object().expect("openapi.json has no paths");
        let routes: Vec<_> = routes_in_source()
            .into_iter()
            .filter(|(path, _)| path.starts_with("/api/") && path != "/api/bucket/")
            .collect();
        assert!(
            routes.len() > 20,
            "routes not found in the source: {routes:?}"
        );
        let mut missing = Vec::new();
        for (path, methods) in &routes {
            let Some(mut item) = paths.get(path) else {
                missing.push(format!("{path} (path)"));
                continue;
            };
            // A path item may be a `$ref` to `components/pathItems`.
            if let Some(target) = item["$ref"].as_str().and_then(|r| r.strip_prefix('#')) {
                item = doc.pointer(target).unwrap_or(&Value::Null);
            }
            for method in methods {
                if item.get(*method).is_none() {
                    missing.push(format!("{} {path}", method.to_uppercase()));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "appliance/assets/openapi.json lacks routes of the router: {missing:?}"
        );
    }

    #[test]
    fn route_reader_sees_methods() {
        let routes = routes_in_source();
        let methods_of = |path: &str| {
            routes
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, m)| m.clone())
                .unwrap_or_default()
        };
        assert_eq!(methods_of("/api/bucket/{id}"), ["get", "put", "delete"]);
        assert_eq!(methods_of("/api/oauth/token"), ["post"]);
    }
}
