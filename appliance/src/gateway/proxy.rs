//! Forwarding a request to another local HTTP server (a role of km, the setup wizard),
//! websocket upgrades included: what nginx did in front of the original services.
//! The request keeps its Host (pages check Origin against it); the upstream learns the
//! client's address from `X-Forwarded-For`, which is replaced, never appended to.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::uri::{PathAndQuery, Scheme};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, Version, header};
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// How long an upstream has to answer with its headers (bodies may take longer).
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
];

/// A local HTTP server requests are forwarded to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// What it is, for errors and `/healthz` (`api`, `the setup wizard`).
    pub name: &'static str,
    /// `host:port`.
    authority: String,
}

impl Upstream {
    /// The server listening on `addr` (an unspecified address means this host).
    pub fn at(name: &'static str, addr: SocketAddr) -> Upstream {
        let host = if addr.ip().is_unspecified() {
            SocketAddr::new(
                match addr {
                    SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                    SocketAddr::V6(_) => IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
                },
                addr.port(),
            )
        } else {
            addr
        };
        Upstream {
            name,
            authority: host.to_string(),
        }
    }

    /// The server of a base URL `http://host:port` (settings are checked beforehand).
    pub fn from_url(name: &'static str, url: &str) -> Option<Upstream> {
        let uri: Uri = url.parse().ok()?;
        (uri.scheme() == Some(&Scheme::HTTP)).then_some(())?;
        Some(Upstream {
            name,
            authority: uri.authority()?.as_str().to_string(),
        })
    }

    /// `http://host:port` of this upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.authority)
    }
}

/// The connection pool to the upstreams.
#[derive(Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Body>,
}

impl Default for Proxy {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        Proxy {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// Where a request came from and over what, as the front door saw it.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    pub client: IpAddr,
    pub https: bool,
}

impl Proxy {
    /// Forwards `request` to `to` and returns its answer; a websocket upgrade the upstream
    /// accepts is then joined to the client's connection until either side closes.
    pub async fn forward(&self, to: &Upstream, origin: Origin, mut request: Request) -> Response {
        let client_upgrade = request
            .headers()
            .contains_key(header::UPGRADE)
            .then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        // HTTP/2 carries the host in the URI only; HTTP/1.1 upstreams need the header.
        if !parts.headers.contains_key(header::HOST)
            && let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
        let Ok(uri) = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(to.authority.as_str())
            .path_and_query(path)
            .build()
        else {
            return (StatusCode::BAD_REQUEST, "request path cannot be forwarded").into_response();
        };
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let upgrade = client_upgrade
            .is_some()
            .then(|| upgrade_headers(&parts.headers));
        strip_hop_by_hop(&mut parts.headers);
        if let Some((connection, protocol)) = upgrade {
            parts.headers.insert(header::CONNECTION, connection);
            parts.headers.insert(header::UPGRADE, protocol);
        }
        set_forwarded(&mut parts.headers, origin);

        let answer = tokio::time::timeout(
            ANSWER_WITHIN,
            self.client.request(Request::from_parts(parts, body)),
        )
        .await;
        let mut answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return unreachable(to, &e.to_string()),
            Err(_) => return unreachable(to, "no answer within 120 s"),
        };
        if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return unreachable(to, "switched protocols unasked");
            };
            let upstream_upgrade = hyper::upgrade::on(&mut answer);
            tokio::spawn(join_upgraded(client_upgrade, upstream_upgrade));
        } else {
            strip_hop_by_hop(answer.headers_mut());
        }
        answer.map(Body::new)
    }
}

/// The client's address: the peer's, or, when the peer is this host (a gateway in front),
/// the last `X-Forwarded-For` entry, the one the gateway wrote.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    // A front door replaces the header with the address it saw; anything before the last
    // entry would be the client's own say.
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|v| v.trim().parse::<IpAddr>().ok());
    match forwarded {
        Some(ip) if peer.ip().is_loopback() => ip,
        _ => peer.ip(),
    }
}

fn upgrade_headers(headers: &HeaderMap) -> (HeaderValue, HeaderValue) {
    let protocol = headers
        .get(header::UPGRADE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("websocket"));
    (HeaderValue::from_static("upgrade"), protocol)
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

fn set_forwarded(headers: &mut HeaderMap, origin: Origin) {
    if let Ok(ip) = HeaderValue::from_str(&origin.client.to_string()) {
        headers.insert("x-forwarded-for", ip);
    }
    headers.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if origin.https { "https" } else { "http" }),
    );
}

async fn join_upgraded(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let _ = tokio::io::copy_bidirectional(
                &mut TokioIo::new(client),
                &mut TokioIo::new(upstream),
            )
            .await;
        }
        Err(e) => tracing::debug!(error = %e, "websocket upgrade not completed"),
    }
}

fn unreachable(to: &Upstream, why: &str) -> Response {
    tracing::warn!(upstream = to.name, address = %to.authority, error = why, "upstream unreachable");
    (
        StatusCode::BAD_GATEWAY,
        format!("{} is not answering at {}: {why}\n", to.name, to.authority),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_address_is_trusted_only_from_this_host() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.2.3.4, 10.0.0.9"),
        );
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        assert_eq!(
            client_ip(local, &headers),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(remote, &headers), remote.ip());
        assert_eq!(client_ip(local, &HeaderMap::new()), local.ip());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::COOKIE));
    }

    #[test]
    fn upstreams_of_wildcard_addresses_are_this_host() {
        let u = Upstream::at("api", "0.0.0.0:3010".parse().unwrap());
        assert_eq!(u.url(), "http://127.0.0.1:3010");
        assert_eq!(
            Upstream::from_url("wizard", "http://127.0.0.1:8090")
                .unwrap()
                .url(),
            "http://127.0.0.1:8090"
        );
        assert!(Upstream::from_url("wizard", "https://127.0.0.1:8090").is_none());
    }
}
