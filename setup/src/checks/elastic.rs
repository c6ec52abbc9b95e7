//! `KM_ELASTICSEARCH_URL`: who answers (Elasticsearch or OpenSearch, version), an index template put and deleted.

use super::*;
use elasticsearch::Elasticsearch;
use elasticsearch::indices::{IndicesDeleteIndexTemplateParts, IndicesPutIndexTemplateParts};
use km_stores::elastic as store;

/// Asks `KM_ELASTICSEARCH_URL` who it is (Elasticsearch 7.10+ or OpenSearch), then puts
/// and deletes the index template `km-setup-check`, as the events store installs its own.
pub async fn check_elasticsearch(urls: &[Url]) -> Check {
    let check = bounded(ELASTIC, "Elasticsearch", elastic_steps(urls)).await;
    urls.iter()
        .fold(check, |check, url| check.redacted(url.password()))
}

async fn elastic_steps(urls: &[Url]) -> Step<Check> {
    if urls.is_empty() {
        return Err(Check::failed(ELASTIC, "no URL given"));
    }
    let (client, hosts) =
        store::open(urls, TIMEOUT).map_err(|e| Check::failed(ELASTIC, e.to_string()))?;
    let unreachable = reach_any(ELASTIC, &hosts).await?;
    let info = elastic_info(&client, &hosts, urls).await?;
    store::supported_version(&info).map_err(|e| Check::failed(ELASTIC, format!("{hosts} {e}")))?;
    put_and_delete_template(&client, &hosts).await?;
    let product = if info["version"]["distribution"] == "opensearch" {
        "OpenSearch"
    } else {
        "Elasticsearch"
    };
    let version = info["version"]["number"].as_str().unwrap_or("unknown");
    let detail = format!("{product} {version} at {hosts}: index templates can be created");
    Ok(ok_unless_unreachable(ELASTIC, detail, &unreachable))
}

/// `GET /`, with refused credentials told apart from other answers.
async fn elastic_info(client: &Elasticsearch, hosts: &str, urls: &[Url]) -> Step<Value> {
    let response = client.info().send().await.map_err(|e| {
        Check::failed(
            ELASTIC,
            format!("cannot connect to {hosts}: {}", with_causes(&e)),
        )
    })?;
    let status = response.status_code();
    let body: Value = response.json().await.unwrap_or_default();
    let reason = error_reason(&body);
    let with_user = urls.iter().any(|u| !u.username().is_empty());
    let detail = match status.as_u16() {
        200..=299 => return Ok(body),
        401 if with_user => format!("{hosts} refused the user name or password (401): {reason}"),
        401 => format!(
            "{hosts} requires a user name and password (401): put them in the URL (https://USER:PASSWORD@host:9200)"
        ),
        403 => format!("the user may not read the cluster's information (403): {reason}"),
        _ => format!("{hosts} answered {status}: {reason}"),
    };
    Err(Check::failed(ELASTIC, detail))
}

/// The reason in an Elasticsearch error body.
fn error_reason(body: &Value) -> String {
    body["error"]["reason"]
        .as_str()
        .or_else(|| body["error"].as_str())
        .unwrap_or("no reason given")
        .to_string()
}

async fn put_and_delete_template(client: &Elasticsearch, hosts: &str) -> Step<()> {
    let body = json!({
        "index_patterns": [format!("{TEMPLATE}-*")],
        "template": {"settings": {"number_of_replicas": 0}},
    });
    let put = client
        .indices()
        .put_index_template(IndicesPutIndexTemplateParts::Name(TEMPLATE))
        .body(body)
        .send()
        .await;
    elastic_answer(put, hosts, "create the index template km-setup-check").await?;
    let delete = client
        .indices()
        .delete_index_template(IndicesDeleteIndexTemplateParts::Name(TEMPLATE))
        .send()
        .await;
    elastic_answer(delete, hosts, "delete the index template km-setup-check").await
}

/// Whether a request `doing` something succeeded, with the server's reason if not.
async fn elastic_answer(
    sent: Result<elasticsearch::http::response::Response, elasticsearch::Error>,
    hosts: &str,
    doing: &str,
) -> Step<()> {
    let response = sent.map_err(|e| {
        Check::failed(
            ELASTIC,
            format!("{hosts}: cannot {doing}: {}", with_causes(&e)),
        )
    })?;
    let status = response.status_code();
    if status.is_success() {
        return Ok(());
    }
    let reason = error_reason(&response.json().await.unwrap_or_default());
    let hint = if status.as_u16() == 403 {
        " (the user needs the manage_index_templates privilege)"
    } else {
        ""
    };
    Err(Check::failed(
        ELASTIC,
        format!("{hosts}: cannot {doing}: {status}: {reason}{hint}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::*;

    #[tokio::test]
    async fn elasticsearch_good_url_passes_and_removes_its_template() {
        if !km_e2e::enabled("an Elasticsearch-API server (osmem-server)") {
            return;
        }
        let server = km_e2e::OsMem::start().unwrap();
        let urls = store::parse_urls(server.url()).unwrap();
        let check = check_elasticsearch(&urls).await;
        assert_status(&check, Status::Ok, "index templates can be created");
        let template = format!(
            "{}/_index_template/{TEMPLATE}",
            server.url().trim_end_matches('/')
        );
        let status = reqwest::get(&template).await.unwrap().status();
        assert_eq!(status, 404, "the scratch template was left behind");
    }

    #[tokio::test]
    async fn elasticsearch_closed_port_is_connection_refused() {
        let port = closed_port();
        let urls = store::parse_urls(&format!("http://elastic:hunter2@127.0.0.1:{port}")).unwrap();
        let check = check_elasticsearch(&urls).await;
        assert_status(
            &check,
            Status::Failed,
            &format!("cannot connect to 127.0.0.1:{port}: connection refused"),
        );
        assert!(!check.to_string().contains("hunter2"), "{check}");
    }

    #[test]
    fn elasticsearch_version_rule() {
        let es = |v: &str| json!({"version": {"number": v}});
        assert!(store::supported_version(&es("7.10.2")).is_ok());
        assert!(store::supported_version(&es("8.15.0")).is_ok());
        assert!(store::supported_version(&es("7.9.3")).is_err());
        let opensearch = json!({"version": {"number": "1.3.0", "distribution": "opensearch"}});
        assert!(store::supported_version(&opensearch).is_ok());
    }
}
