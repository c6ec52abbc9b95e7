//! The front door's routes. In every mode it answers ACME challenges itself and passes
//! `/wizard/` to the setup wizard (`KM_WIZARD_URL`): admins reach it through the site URL,
//! and their dashboard session (same origin) lets the wizard reopen for them. With the
//! roles apart (`km serve --role gateway`) it forwards every other path to its role, as
//! the original nginx did: `/interaction` to the interactor, `/primus` to realtime,
//! `/api/oauth` to auth, the rest of `/api` and the dashboard to api.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::proxy::{Origin, Proxy, Upstream};
use km_config::{RoleAddresses, Settings};
use km_tls::{OverTls, Tls};

/// What the front door needs: the TLS state (its ACME answers), where the wizard and
/// the roles listen, and the connections to them.
pub struct Front {
    pub tls: Arc<Tls>,
    wizard: Option<Upstream>,
    /// The roles, when they run apart (`None` when this process serves every route).
    roles: Option<RoleUpstreams>,
    proxy: Proxy,
    /// Asks the roles for their `/healthz` (one pool, not one per request).
    health_client: reqwest::Client,
}

/// The roles requests are forwarded to, and the workers (asked for their health and
/// counters only).
struct RoleUpstreams {
    api: Upstream,
    auth: Upstream,
    realtime: Upstream,
    interactor: Upstream,
    workers: Upstream,
}

impl RoleUpstreams {
    fn new(addresses: &RoleAddresses) -> Self {
        RoleUpstreams {
            api: Upstream::at("api", addresses.api),
            auth: Upstream::at("auth", addresses.auth),
            realtime: Upstream::at("realtime", addresses.realtime),
            interactor: Upstream::at("interactor", addresses.interactor),
            workers: Upstream::at("workers", addresses.workers),
        }
    }

    /// The role that serves `path`.
    fn for_path(&self, path: &str) -> &Upstream {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        };
        if under("/interaction") {
            &self.interactor
        } else if under("/primus") {
            &self.realtime
        } else if under("/api/oauth") {
            &self.auth
        } else {
            &self.api
        }
    }

    fn all(&self) -> [&Upstream; 5] {
        [
            &self.api,
            &self.auth,
            &self.realtime,
            &self.interactor,
            &self.workers,
        ]
    }
}

impl Front {
    /// The front door of a process that serves every route itself.
    pub fn in_process(tls: Arc<Tls>, settings: &Settings) -> Arc<Front> {
        Arc::new(Front {
            tls,
            wizard: wizard_upstream(settings),
            roles: None,
            proxy: Proxy::default(),
            health_client: reqwest::Client::new(),
        })
    }

    /// The front door of the roles running apart, at `settings.roles`.
    pub fn forwarding(tls: Arc<Tls>, settings: &Settings) -> Arc<Front> {
        Arc::new(Front {
            tls,
            wizard: wizard_upstream(settings),
            roles: Some(RoleUpstreams::new(&settings.roles)),
            proxy: Proxy::default(),
            health_client: reqwest::Client::new(),
        })
    }

    /// The routes the front door answers in every mode, for any router's state.
    pub fn routes<S: Clone + Send + Sync + 'static>(self: &Arc<Self>) -> Router<S> {
        Router::new()
            .route("/.well-known/acme-challenge/{token}", get(acme_challenge))
            // The wizard's site URL check fetches this through the site URL.
            .route("/.well-known/km-setup-probe", get(to_wizard))
            .route("/wizard", any(to_wizard))
            .route("/wizard/", any(to_wizard))
            .route("/wizard/{*rest}", any(to_wizard))
            .with_state(self.clone())
    }

    /// Every route of `km serve --role gateway`: its own, `/healthz` of all roles, and
    /// the rest forwarded.
    pub fn gateway_router(self: &Arc<Self>) -> Router {
        let router = self
            .routes()
            .route("/healthz", get(roles_health))
            .route("/metrics", get(roles_metrics))
            .fallback(to_role)
            .with_state(self.clone());
        crate::routes::closing_after_too_large(router)
    }

    async fn pass(&self, to: &Upstream, request: Request) -> Response {
        let peer = request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        // The front door trusts no X-Forwarded-For: the peer is the client.
        let origin = Origin {
            client: peer.map_or([127, 0, 0, 1].into(), |peer| peer.ip()),
            https: request.extensions().get::<OverTls>().is_some(),
        };
        self.proxy.forward(to, origin, request).await
    }
}

fn wizard_upstream(settings: &Settings) -> Option<Upstream> {
    settings
        .wizard_url
        .as_deref()
        .and_then(|url| Upstream::from_url("the setup wizard", url))
}

/// `GET /.well-known/acme-challenge/{token}` on port 80: the gateway's own answers, else
/// the wizard's (its trial order of an ACME setup is validated through this port too).
async fn acme_challenge(
    State(front): State<Arc<Front>>,
    Path(token): Path<String>,
    request: Request,
) -> Response {
    match (front.tls.challenges().response(&token), &front.wizard) {
        (Some(answer), _) => answer,
        (None, Some(wizard)) => front.pass(wizard, request).await,
        (None, None) => (StatusCode::NOT_FOUND, "no such ACME challenge\n").into_response(),
    }
}

async fn to_wizard(State(front): State<Arc<Front>>, request: Request) -> Response {
    let Some(wizard) = &front.wizard else {
        return (StatusCode::NOT_FOUND, "no setup wizard on this appliance\n").into_response();
    };
    let answer = front.pass(wizard, request).await;
    if answer.status() != StatusCode::BAD_GATEWAY {
        return answer;
    }
    // The wizard stops once settings are applied (the appliance's units).
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "The setup wizard is not running: the settings were applied.\n\
         To change them, run `sudo km-wizard reopen` on the appliance; it prints a new setup URL.\n",
    )
        .into_response()
}

async fn to_role(State(front): State<Arc<Front>>, request: Request) -> Response {
    match &front.roles {
        Some(roles) => {
            let to = roles.for_path(request.uri().path());
            front.pass(to, request).await
        }
        None => (StatusCode::NOT_FOUND, "no such route\n").into_response(),
    }
}

/// `GET /healthz` of the gateway: each role's own `/healthz` and the TLS state; `ok` only
/// when every role answers `ok`, else `degraded` (503 when a role does not answer, or
/// another process answers in its place).
async fn roles_health(State(front): State<Arc<Front>>) -> (StatusCode, Json<Value>) {
    let Some(roles) = &front.roles else {
        return (StatusCode::NOT_FOUND, Json(json!({ "error": "no roles" })));
    };
    let checks = roles.all().map(|role| {
        let client = front.health_client.clone();
        async move {
            let answer = client
                .get(format!("{}/healthz", role.url()))
                .timeout(Duration::from_secs(3))
                .send()
                .await;
            let body = match answer {
                Ok(answer) => answer.json::<Value>().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (role.name, body.and_then(|body| is_role(body, role)))
        }
    });
    let results = futures_util::future::join_all(checks).await;
    let reachable = results.iter().all(|(_, r)| r.is_ok());
    let all_ok = results
        .iter()
        .all(|(_, r)| r.as_ref().is_ok_and(|v| v["status"] == "ok"));
    let status = if all_ok { "ok" } else { "degraded" };
    let roles: serde_json::Map<String, Value> = results
        .into_iter()
        .map(|(name, result)| {
            let value = result.unwrap_or_else(|error| json!({ "status": "down", "error": error }));
            (name.to_string(), value)
        })
        .collect();
    let code = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(json!({
            "status": status,
            "version": env!("CARGO_PKG_VERSION"),
            "tls": front.tls.health(),
            "roles": roles,
        })),
    )
}

/// A role's `/healthz` answer, when it comes from that role: another process on its port
/// (another role, another program) would be sent that role's requests.
fn is_role(body: Value, role: &Upstream) -> Result<Value, String> {
    match body["role"].as_str() {
        Some(name) if name == role.name => Ok(body),
        other => Err(format!(
            "{} answered as {}, not as the {} role: another process holds its port",
            role.url(),
            other.map_or("something else".into(), |name| format!("the {name} role")),
            role.name
        )),
    }
}

/// `GET /metrics` of the gateway: every role's own `/metrics`, asked with the caller's
/// token, each sample labelled with its role (a refusal is passed on as it is).
async fn roles_metrics(State(front): State<Arc<Front>>, headers: HeaderMap) -> Response {
    let Some(roles) = &front.roles else {
        return (StatusCode::NOT_FOUND, "no roles").into_response();
    };
    let token = headers.get(AUTHORIZATION).cloned();
    let asks = roles.all().map(|role| {
        let mut ask = (front.health_client)
            .get(format!("{}/metrics", role.url()))
            .timeout(Duration::from_secs(3));
        if let Some(token) = &token {
            ask = ask.header(AUTHORIZATION, token.clone());
        }
        async move {
            let answer = ask
                .send()
                .await
                .map_err(|e| format!("{}: {e}", role.name))?;
            let status = answer.status();
            let text = answer
                .text()
                .await
                .map_err(|e| format!("{}: {e}", role.name))?;
            Ok::<_, String>((role.name, status, text))
        }
    });
    let mut parts = Vec::new();
    for answer in futures_util::future::join_all(asks).await {
        match answer {
            Ok((name, status, text)) if status.is_success() => parts.push((name, text)),
            Ok((_, status, text)) => return (status, text).into_response(),
            Err(e) => {
                let msg = format!("a role's metrics did not answer: {e}");
                return (StatusCode::SERVICE_UNAVAILABLE, msg).into_response();
            }
        }
    }
    let parts: Vec<(&str, &str)> = parts.iter().map(|(n, t)| (*n, t.as_str())).collect();
    let content_type = HeaderValue::from_static(crate::metrics::OPENMETRICS);
    (
        [(CONTENT_TYPE, content_type)],
        crate::metrics::by_role(&parts),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_go_to_their_role() {
        let roles = RoleUpstreams::new(&RoleAddresses {
            api: "127.0.0.1:1".parse().unwrap(),
            auth: "127.0.0.1:2".parse().unwrap(),
            realtime: "127.0.0.1:3".parse().unwrap(),
            interactor: "127.0.0.1:4".parse().unwrap(),
            workers: "127.0.0.1:5".parse().unwrap(),
        });
        let role = |path: &str| roles.for_path(path).name;
        assert_eq!(role("/interaction"), "interactor");
        assert_eq!(role("/primus"), "realtime");
        assert_eq!(role("/primus/"), "realtime");
        assert_eq!(role("/api/oauth/token"), "auth");
        assert_eq!(role("/api/oauthx"), "api");
        assert_eq!(role("/api/node/verifyPM2"), "api");
        assert_eq!(role("/api/bucket/x"), "api");
        assert_eq!(role("/interactions"), "api");
        assert_eq!(role("/"), "api");
        assert_eq!(role("/buckets/x"), "api");
    }

    #[test]
    fn a_role_port_answered_by_another_process_is_not_that_role() {
        let auth = Upstream::at("auth", "127.0.0.1:2".parse().unwrap());
        assert!(is_role(json!({"role": "auth", "status": "ok"}), &auth).is_ok());
        let other = is_role(json!({"role": "realtime", "status": "ok"}), &auth).unwrap_err();
        assert!(
            other.contains("as the realtime role, not as the auth role"),
            "{other}"
        );
        let stranger = is_role(json!({"status": "ok"}), &auth).unwrap_err();
        assert!(stranger.contains("as something else"), "{stranger}");
    }
}
