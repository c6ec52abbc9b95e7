//! The plain-HTTP port when TLS is on: every request is sent to the same path on HTTPS
//! (308, so methods and bodies are kept), except the ACME challenges (the CA validates
//! over HTTP) and `/healthz` (probes and load balancers check the port itself).

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};

use km_tls::challenge::CHALLENGE_PREFIX;

/// Where the HTTPS site is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpsBase {
    /// The https `KM_SITE_URL` (no trailing slash); paths are appended to it.
    Site(String),
    /// No https site URL: the host the client asked for, on this HTTPS port.
    RequestHost { port: u16 },
}

impl HttpsBase {
    /// The https `KM_SITE_URL` when there is one, else the request's host on `https_port`.
    pub fn new(site_url: Option<&str>, https_port: u16) -> Self {
        match site_url {
            Some(url) if url.starts_with("https://") => {
                HttpsBase::Site(url.trim_end_matches('/').to_string())
            }
            _ => HttpsBase::RequestHost { port: https_port },
        }
    }
}

/// What the plain-HTTP port does with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Served here, over HTTP.
    Plain,
    /// Redirected to this https URL.
    Https(String),
    /// No site URL and no usable `Host` header: nowhere to redirect to.
    NoHost,
}

/// The rule of the plain-HTTP port for `uri`, asked for with `Host: host`.
pub fn route(base: &HttpsBase, uri: &Uri, host: Option<&str>) -> Route {
    let path = uri.path();
    if path == "/healthz" || path.starts_with(CHALLENGE_PREFIX) {
        return Route::Plain;
    }
    let path_and_query = uri.path_and_query().map_or(path, |pq| pq.as_str());
    match base {
        HttpsBase::Site(site) => Route::Https(format!("{site}{path_and_query}")),
        HttpsBase::RequestHost { port } => match host.and_then(host_without_port) {
            Some(host) if *port == 443 => Route::Https(format!("https://{host}{path_and_query}")),
            Some(host) => Route::Https(format!("https://{host}:{port}{path_and_query}")),
            None => Route::NoHost,
        },
    }
}

/// `example.com:80` → `example.com`, `[::1]:80` → `[::1]`; `None` when it is not a host.
fn host_without_port(host: &str) -> Option<&str> {
    let host = match host.strip_prefix('[') {
        Some(v6) => &host[..v6.find(']')? + 2],
        None => host.split(':').next()?,
    };
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:_".contains(&b));
    valid.then_some(host)
}

/// `router` behind the redirect rule, for the plain-HTTP port.
pub fn redirecting(router: Router, base: HttpsBase) -> Router {
    router.layer(middleware::from_fn_with_state(Arc::new(base), redirect))
}

async fn redirect(State(base): State<Arc<HttpsBase>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match route(&base, request.uri(), host) {
        Route::Plain => next.run(request).await,
        Route::Https(url) => Redirect::permanent(&url).into_response(),
        Route::NoHost => (
            StatusCode::BAD_REQUEST,
            "this site is served over HTTPS: send a Host header, or set KM_SITE_URL\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn site_url_base_keeps_path_and_query() {
        let base = HttpsBase::new(Some("https://km.example.com/"), 443);
        assert_eq!(
            route(&base, &uri("/api/bucket?limit=5"), Some("10.0.0.1")),
            Route::Https("https://km.example.com/api/bucket?limit=5".into())
        );
        assert_eq!(
            route(&base, &uri("/"), None),
            Route::Https("https://km.example.com/".into())
        );
        let prefixed = HttpsBase::new(Some("https://example.com:8443/km"), 443);
        assert_eq!(
            route(&prefixed, &uri("/interaction"), None),
            Route::Https("https://example.com:8443/km/interaction".into())
        );
    }

    #[test]
    fn health_and_acme_challenges_stay_on_http() {
        let base = HttpsBase::new(Some("https://km.example.com"), 443);
        for path in [
            "/healthz",
            "/healthz?verbose=1",
            "/.well-known/acme-challenge/abc-DEF_1",
        ] {
            assert_eq!(route(&base, &uri(path), None), Route::Plain, "{path}");
        }
        for path in [
            "/healthzz",
            "/.well-known/acme-challenge",
            "/.well-known/other",
            "/api/healthz",
        ] {
            assert!(
                matches!(route(&base, &uri(path), None), Route::Https(_)),
                "{path}"
            );
        }
    }

    #[test]
    fn without_https_site_url_the_request_host_is_used() {
        // An http:// site URL would loop back here: the request's host is used instead.
        let base = HttpsBase::new(Some("http://km.example.com"), 8443);
        assert_eq!(base, HttpsBase::RequestHost { port: 8443 });
        assert_eq!(
            route(&base, &uri("/login?next=%2F"), Some("km.example.com:8080")),
            Route::Https("https://km.example.com:8443/login?next=%2F".into())
        );
        let default_port = HttpsBase::new(None, 443);
        assert_eq!(
            route(&default_port, &uri("/x"), Some("[::1]:80")),
            Route::Https("https://[::1]/x".into())
        );
        assert_eq!(route(&default_port, &uri("/x"), None), Route::NoHost);
        assert_eq!(
            route(&default_port, &uri("/x"), Some("evil.com/@x")),
            Route::NoHost
        );
        assert_eq!(
            route(&default_port, &uri("/x"), Some("[::1")),
            Route::NoHost
        );
    }
}
