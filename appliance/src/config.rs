//! Settings of `km serve`, declared once: each has a flag, a `KM_*` variable and a
//! validation rule. Every problem is collected and reported together, naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::stores::elastic::parse_urls;
use elasticsearch::http::Url;

/// Raw settings as given by flags or environment (strings, validated by [`Settings::from_raw`]).
#[derive(Debug, Clone, Args)]
pub struct RawSettings {
    /// Address the single HTTP/websocket port listens on.
    #[arg(long, env = "KM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Directory holding the embedded stores.
    #[arg(long, env = "KM_DATA_DIR", default_value = "./km-data")]
    pub data_dir: PathBuf,
    /// Public URL agents and browsers use to reach this appliance (default: from --listen).
    #[arg(long, env = "KM_SITE_URL")]
    pub site_url: Option<String>,
    /// MongoDB connection string for the documents store (default: embedded SQLite).
    #[arg(long, env = "KM_MONGO_URL", hide_env_values = true)]
    pub mongo_url: Option<String>,
    /// Redis for the bus between several nodes (default: in-process).
    #[arg(long, env = "KM_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Elasticsearch / OpenSearch for events: `http(s)://host:port`, several separated by
    /// spaces (default: embedded SQLite).
    #[arg(long, env = "KM_ELASTICSEARCH_URL", hide_env_values = true)]
    pub elasticsearch_url: Option<String>,
    /// Older name of `KM_ELASTICSEARCH_URL`.
    #[arg(skip = std::env::var("KM_ELASTICSEARCH_HOST").ok())]
    pub elasticsearch_host: Option<String>,
    /// Prefix of the daily indices (`<prefix>-<kind>-YYYY.MM.DD`).
    #[arg(long, env = "KM_ELASTICSEARCH_PREFIX", default_value = "km")]
    pub elasticsearch_prefix: String,
    /// Days of events (metrics, logs, exceptions...) kept.
    #[arg(long, env = "KM_RETENTION_DAYS", default_value = "30")]
    pub retention_days: String,
    /// Days of logs kept (default: as `KM_RETENTION_DAYS`).
    #[arg(long, env = "KM_LOGS_RETENTION_DAYS")]
    pub logs_retention_days: Option<String>,
    /// Whether anyone may sign up once the first account exists (`true`/`false`); when
    /// closed, admins create the accounts.
    #[arg(long, env = "KM_ALLOW_SIGNUP", default_value = "false")]
    pub allow_signup: String,
}

impl RawSettings {
    /// The defaults with the given data dir (what `km serve --data-dir DIR` parses to
    /// without environment), for tests and benchmarks.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        RawSettings {
            listen: "127.0.0.1:8080".into(),
            data_dir: data_dir.into(),
            site_url: None,
            mongo_url: None,
            redis_url: None,
            elasticsearch_url: None,
            elasticsearch_host: None,
            elasticsearch_prefix: "km".into(),
            retention_days: "30".into(),
            logs_retention_days: None,
            allow_signup: "false".into(),
        }
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Explicit public URL, without trailing slash; `None` derives it from the bound address.
    pub site_url: Option<String>,
    /// MongoDB for documents; `None` keeps them in the data dir.
    pub mongo_url: Option<String>,
    /// Redis for the bus; `None` keeps it in process (one node).
    pub redis_url: Option<String>,
    /// Elasticsearch nodes for events; empty keeps them in the data dir.
    pub elasticsearch: Vec<Url>,
    pub elasticsearch_prefix: String,
    pub retention_days: u32,
    pub logs_retention_days: u32,
    pub allow_signup: bool,
}

/// All problems found in the settings, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Settings {
    pub fn from_raw(raw: RawSettings) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let listen = raw
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| {
                errors.push(format!(
                    "KM_LISTEN (--listen): {:?} is not an address like 127.0.0.1:8080: {e}",
                    raw.listen
                ))
            })
            .ok();
        let site_url = raw.site_url.as_deref().and_then(|url| {
            check_site_url(url)
                .map_err(|e| errors.push(format!("KM_SITE_URL (--site-url): {e}")))
                .ok()
        });
        let mut days = |value: &str, var: &str| match value.parse::<u32>() {
            Ok(days) if days > 0 => Some(days),
            _ => {
                errors.push(format!(
                    "{var}: {value:?} is not a whole number of days above 0"
                ));
                None
            }
        };
        let retention_days = days(&raw.retention_days, "KM_RETENTION_DAYS (--retention-days)");
        let logs_retention_days = match raw.logs_retention_days.as_deref() {
            Some(v) => days(v, "KM_LOGS_RETENTION_DAYS (--logs-retention-days)"),
            None => retention_days,
        };
        if let Some(url) = &raw.mongo_url
            && !(url.starts_with("mongodb://") || url.starts_with("mongodb+srv://"))
        {
            // The value may hold a password: it is not repeated.
            errors.push(
                "KM_MONGO_URL (--mongo-url): must start with mongodb:// or mongodb+srv://".into(),
            );
        }
        if let Some(url) = &raw.redis_url
            && !url.is_empty()
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            errors.push(
                "KM_REDIS_URL (--redis-url): must start with redis:// (or rediss:// for TLS)"
                    .into(),
            );
        }
        let elasticsearch = raw
            .elasticsearch_url
            .as_deref()
            .or(raw.elasticsearch_host.as_deref())
            .filter(|v| !v.trim().is_empty())
            .map_or(Ok(Vec::new()), parse_urls)
            .unwrap_or_else(|e| {
                errors.push(format!("KM_ELASTICSEARCH_URL (--elasticsearch-url): {e}"));
                Vec::new()
            });
        let prefix_ok = !raw.elasticsearch_prefix.is_empty()
            && raw
                .elasticsearch_prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !prefix_ok {
            errors.push(format!(
                "KM_ELASTICSEARCH_PREFIX: {:?} must be lowercase letters, digits or '_'",
                raw.elasticsearch_prefix
            ));
        }
        let allow_signup = match raw.allow_signup.trim() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" => Some(false),
            other => {
                errors.push(format!(
                    "KM_ALLOW_SIGNUP (--allow-signup): {other:?} is not true or false"
                ));
                None
            }
        };
        match (listen, retention_days, logs_retention_days, allow_signup) {
            (Some(listen), Some(retention_days), Some(logs_retention_days), Some(allow_signup))
                if errors.is_empty() =>
            {
                Ok(Settings {
                    listen,
                    data_dir: raw.data_dir,
                    site_url,
                    mongo_url: raw.mongo_url.filter(|u| !u.is_empty()),
                    redis_url: raw.redis_url.filter(|u| !u.is_empty()),
                    elasticsearch,
                    elasticsearch_prefix: raw.elasticsearch_prefix,
                    retention_days,
                    logs_retention_days,
                    allow_signup,
                })
            }
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// The public base URL: `KM_SITE_URL`, or derived from the address actually bound.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        match &self.site_url {
            Some(url) => url.clone(),
            None if bound.ip().is_unspecified() => format!("http://127.0.0.1:{}", bound.port()),
            None => format!("http://{bound}"),
        }
    }
}

/// `KM_SITE_URL` must be an absolute http(s) URL with a host; returned without trailing slash.
fn check_site_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{url:?} must start with http:// or https://"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawSettings {
        RawSettings::with_data_dir("./d")
    }

    #[test]
    fn reports_every_bad_variable_by_name() {
        let err = Settings::from_raw(RawSettings {
            listen: "nope".into(),
            site_url: Some("km.example.com".into()),
            retention_days: "-1".into(),
            mongo_url: Some("http://user:hunter2@db".into()),
            elasticsearch_url: Some("http://[es".into()),
            redis_url: Some("http://:pw@cache".into()),
            elasticsearch_prefix: "KM".into(),
            ..raw()
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        for var in [
            "KM_LISTEN",
            "KM_SITE_URL",
            "KM_RETENTION_DAYS",
            "KM_MONGO_URL",
        ] {
            assert!(err.contains(var), "{var} missing from: {err}");
        }
        assert!(!err.contains("hunter2"), "a password was repeated: {err}");
    }

    #[test]
    fn elasticsearch_url_alias_and_seed_format() {
        let s = Settings::from_raw(RawSettings {
            elasticsearch_host: Some("es1:9200 es2:9200".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(s.elasticsearch.len(), 2);
        let s = Settings::from_raw(RawSettings {
            elasticsearch_url: Some("https://es:9243".into()),
            elasticsearch_host: Some("ignored:1".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(
            s.elasticsearch
                .iter()
                .map(|u| u.as_str())
                .collect::<Vec<_>>(),
            ["https://es:9243/"]
        );
    }

    #[test]
    fn public_url_from_site_url_or_listen() {
        let s = Settings::from_raw(raw()).unwrap();
        assert_eq!(
            s.public_url("0.0.0.0:9000".parse().unwrap()),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            s.public_url("10.1.2.3:80".parse().unwrap()),
            "http://10.1.2.3:80"
        );
        let s = Settings::from_raw(RawSettings {
            site_url: Some("https://km.example.com/".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(
            s.public_url("0.0.0.0:80".parse().unwrap()),
            "https://km.example.com"
        );
    }
}
