//! `KM_SITE_URL`: resolves, and with a probe leads back to this appliance.

use super::*;

/// Checks `KM_SITE_URL` is an http(s) URL whose host resolves; with `probe` = (path,
/// nonce), fetches `<url><path>` and compares the body with the nonce, to see that the
/// URL leads back to this appliance. An unreachable URL is only a warning: the
/// appliance may not see itself the way agents and browsers do (NAT, split DNS).
pub async fn check_site_url(url: &str, probe: Option<(&str, &str)>) -> Check {
    bounded(SITE, url, site_steps(url, probe))
        .await
        .redacted(url_password(url))
}

async fn site_steps(url: &str, probe: Option<(&str, &str)>) -> Step<Check> {
    let parsed = site_url(url)?;
    let host = parsed.host_str().unwrap_or_default();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let addrs = resolve(host, port).await.map_err(|why| {
        Check::failed(
            SITE,
            format!("{why}; agents and browsers reach the appliance by this name: give it a DNS record pointing here"),
        )
    })?;
    let Some((path, nonce)) = probe else {
        let listed: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
        return Ok(Check::ok(
            SITE,
            format!("{host} resolves to {}", listed.join(", ")),
        ));
    };
    let target = format!("{}{path}", url.trim_end_matches('/'));
    Ok(site_probe(&target, nonce).await)
}

/// `url` parsed, if it is an absolute http(s) URL with a host and no credentials.
fn site_url(url: &str) -> Step<Url> {
    let parsed = Url::parse(url).map_err(|e| {
        Check::failed(
            SITE,
            format!("{url:?} is not a URL like https://km.example.com: {e}"),
        )
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Check::failed(
            SITE,
            format!("{url:?} must start with http:// or https://"),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(Check::failed(SITE, format!("{url:?} has no host")));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(Check::failed(
            SITE,
            "must not hold a user name or password (it is shown to agents and browsers)",
        ));
    }
    Ok(parsed)
}

/// Fetches `target` and compares its body with `nonce`; any miss is a warning.
async fn site_probe(target: &str, nonce: &str) -> Check {
    let unreachable = |why: String| {
        Check::warning(
            SITE,
            format!(
                "could not reach {target} from inside the appliance: {why}; agents and browsers must be able to reach it"
            ),
        )
    };
    let client = match reqwest::Client::builder().timeout(TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => return unreachable(with_causes(&e)),
    };
    let response = match client.get(target).send().await {
        Ok(response) => response,
        Err(e) if e.is_timeout() => {
            return unreachable(format!("no answer within {} s", TIMEOUT.as_secs()));
        }
        Err(e) => return unreachable(network_reason(&e)),
    };
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return unreachable(format!("it answered {status}"));
    }
    if body.trim() != nonce {
        return Check::warning(
            SITE,
            format!(
                "{target} answered, but not as this appliance: another server answers at this address (an old DNS record, or a proxy that does not forward here?)"
            ),
        );
    }
    Check::ok(SITE, format!("{target} leads back to this appliance"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::*;

    /// A server answering `GET /probe` with `nonce`, as the wizard will.
    async fn probe_server(nonce: &'static str) -> u16 {
        let app =
            axum::Router::new().route("/probe", axum::routing::get(move || async move { nonce }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    }

    #[tokio::test]
    async fn site_url_probe_finds_this_appliance() {
        crypto();
        let port = probe_server("nonce-1234").await;
        let url = format!("http://localhost:{port}/");
        let check = check_site_url(&url, Some(("/probe", "nonce-1234"))).await;
        assert_status(&check, Status::Ok, "leads back to this appliance");
        let resolved = check_site_url(&url, None).await;
        assert_status(&resolved, Status::Ok, "localhost resolves to");
    }

    #[tokio::test]
    async fn site_url_answered_by_another_server_is_a_warning() {
        crypto();
        let port = probe_server("someone-else").await;
        let url = format!("http://127.0.0.1:{port}");
        let check = check_site_url(&url, Some(("/probe", "nonce-1234"))).await;
        assert_status(&check, Status::Warning, "not as this appliance");
    }

    #[tokio::test]
    async fn site_url_unreachable_is_a_warning() {
        crypto();
        let url = format!("http://127.0.0.1:{}", closed_port());
        let check = check_site_url(&url, Some(("/probe", "nonce-1234"))).await;
        assert_status(&check, Status::Warning, "could not reach");
        assert!(
            check
                .detail
                .contains("agents and browsers must be able to reach it"),
            "{check}"
        );
    }

    #[tokio::test]
    async fn site_url_unresolvable_or_malformed_fails() {
        let check = check_site_url("https://km.invalid", Some(("/probe", "n"))).await;
        assert_status(&check, Status::Failed, "km.invalid does not resolve");
        for bad in [
            "km.example.com",
            "ftp://km.example.com",
            "https://user:pw@km.example.com",
        ] {
            let check = check_site_url(bad, None).await;
            assert_eq!(check.status, Status::Failed, "{bad}: {check}");
            assert!(!check.detail.contains(":pw@"), "{check}");
        }
    }
}
