//! Live checks of the settings that point outside the appliance: each connects to what
//! a setting names, does there what the appliance will do (a scratch write, an index
//! template, a test mail...) and says whether that works, in words a user can act on.
//! The setup wizard and `km config check` run these same functions.
//!
//! Each step is bounded by [`TIMEOUT`], each check by [`LIMIT`]. No detail repeats a
//! password: the one the setting holds is scrubbed from every message.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use elasticsearch::http::Url;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::{TcpStream, lookup_host};

use km_config::table::{self, url_password, url_userinfo};
use km_config::{SmtpSettings, SmtpTls};
use km_tls::with_causes;

mod elastic;
mod mongo;
mod redis;
mod site;
mod smtp;
#[cfg(test)]
mod testkit;
mod tls_files;

pub use elastic::check_elasticsearch;
pub use mongo::check_mongo;
pub use redis::check_redis;
pub use site::check_site_url;
pub use smtp::{SmtpCheckOptions, check_smtp, check_smtp_with};
pub use tls_files::check_tls_files;

/// How long one step (connecting, a command, a fetch) may take.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole check may take (a few steps, each bounded by [`TIMEOUT`]).
pub const LIMIT: Duration = Duration::from_secs(15);

const MONGO: &str = table::MONGO_URL.var;
const ELASTIC: &str = table::ELASTICSEARCH_URL.var;
const REDIS: &str = table::REDIS_URL.var;
const SITE: &str = table::SITE_URL.var;
const TLS_CERT: &str = table::TLS_CERT.var;
const TLS_KEY: &str = table::TLS_KEY.var;
const SMTP_HOST: &str = table::SMTP_HOST.var;
const SMTP_TLS: &str = table::SMTP_TLS.var;
const SMTP_USER: &str = table::SMTP_USER.var;
const SMTP_PASSWORD: &str = table::SMTP_PASSWORD.var;
const SMTP_SENDER: &str = table::SMTP_SENDER.var;

/// Where the scratch records go (MongoDB collection, index template, Redis key prefix).
const SCRATCH: &str = "km_setup_check";
const TEMPLATE: &str = "km-setup-check";
const TEST_MAIL_SUBJECT: &str = "KM appliance test mail";
/// A certificate expiring sooner than this gets a warning.
const RENEW_WITHIN: Duration = Duration::from_secs(14 * 86_400);
/// Oldest Redis major version: ACL users (`redis://user:password@`) came with 6.
const REDIS_MIN_MAJOR: u32 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works from here, but something needs a look (e.g. the site is not reachable
    /// from inside the appliance, which may be fine behind NAT).
    Warning,
    Failed,
}

impl Status {
    /// As serialized: `ok`, `warning`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Failed => "failed",
        }
    }
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// The environment variable the outcome is about.
    pub setting: &'static str,
    pub status: Status,
    /// What was found, for a person; never holds a password.
    pub detail: String,
}

impl Check {
    pub fn ok(setting: &'static str, detail: impl Into<String>) -> Check {
        Check::new(setting, Status::Ok, detail)
    }

    pub fn warning(setting: &'static str, detail: impl Into<String>) -> Check {
        Check::new(setting, Status::Warning, detail)
    }

    pub fn failed(setting: &'static str, detail: impl Into<String>) -> Check {
        Check::new(setting, Status::Failed, detail)
    }

    fn new(setting: &'static str, status: Status, detail: impl Into<String>) -> Check {
        Check {
            setting,
            status,
            detail: detail.into(),
        }
    }

    /// The same check with `secret` (as given and URL-decoded) replaced by `***`.
    fn redacted(mut self, secret: Option<&str>) -> Check {
        for form in secret
            .into_iter()
            .flat_map(|s| [s.to_string(), percent_decoded(s)])
            .filter(|s| !s.is_empty())
        {
            self.detail = self.detail.replace(&form, "***");
        }
        self
    }
}

/// `KM_MONGO_URL: cannot connect to 10.0.0.5:27017: connection refused`.
impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.setting, self.detail)
    }
}

/// A step of a check: `Err` is the check's final answer.
type Step<T> = Result<T, Check>;

/// Runs `check`; past [`LIMIT`], fails saying `what` did not answer in time.
async fn bounded(
    setting: &'static str,
    what: &str,
    check: impl Future<Output = Step<Check>>,
) -> Check {
    match tokio::time::timeout(LIMIT, check).await {
        Ok(Ok(check) | Err(check)) => check,
        Err(_) => Check::failed(
            setting,
            format!("no answer from {what} within {} s", LIMIT.as_secs()),
        ),
    }
}

/// `%40` → `@`: the form a driver may print a URL-encoded password in.
fn percent_decoded(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------
// reaching a host
// ---------------------------------------------------------------------------------------

/// Why a request failed: the network error at its root in a user's words, else the
/// whole chain of causes.
fn network_reason(e: &(dyn StdError + 'static)) -> String {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            return io_reason(io);
        }
        cause = c.source();
    }
    with_causes(e)
}

/// Why a connection failed, in a user's words.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            "connection refused (is the server running and listening on that port?)".into()
        }
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// The addresses of `host`, or why it has none.
async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(TIMEOUT, lookup_host((host, port))).await {
        Err(_) => Err(format!(
            "{host} did not resolve within {} s (is DNS reachable?)",
            TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(format!("{host} does not resolve: {e}")),
        Ok(Ok(addrs)) => Ok(addrs.collect()),
    }
}

/// Opens (and drops) a TCP connection to `host:port`: tells a wrong name, a closed
/// port and a silent network apart before a client library blurs them.
async fn reach(host: &str, port: u16) -> Result<(), String> {
    let mut why = format!("{host} resolves to no address");
    for addr in resolve(host, port).await? {
        match tokio::time::timeout(TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => why = format!("cannot connect to {host}:{port}: {}", io_reason(&e)),
            Err(_) => {
                why = format!(
                    "cannot connect to {host}:{port}: no answer within {} s (a firewall, or a wrong address?)",
                    TIMEOUT.as_secs()
                )
            }
        }
    }
    Err(why)
}

/// Reaches every `host:port` of a comma-separated list; fails only if none answers,
/// else returns the ones that did not (a replica set can work without them).
async fn reach_any(setting: &'static str, hosts: &str) -> Step<Vec<String>> {
    let mut unreachable = Vec::new();
    let mut reached = false;
    for host in hosts.split(',') {
        let Some((name, port)) = host
            .rsplit_once(':')
            .and_then(|(n, p)| Some((n, p.parse::<u16>().ok()?)))
        else {
            reached = true; // A Unix socket: the driver will tell.
            continue;
        };
        match reach(name, port).await {
            Ok(()) => reached = true,
            Err(why) => unreachable.push(why),
        }
    }
    match (reached, unreachable.first()) {
        (false, Some(why)) => Err(Check::failed(setting, why.clone())),
        _ => Ok(unreachable),
    }
}

/// A check that passed, downgraded to a warning if some hosts could not be reached.
fn ok_unless_unreachable(setting: &'static str, detail: String, unreachable: &[String]) -> Check {
    if unreachable.is_empty() {
        Check::ok(setting, detail)
    } else {
        Check::warning(setting, format!("{detail}; but {}", unreachable.join("; ")))
    }
}

/// A certificate the client refused, in a user's words; `None` for other TLS failures.
fn certificate_problem(server: &str, name: &str, e: &rustls::Error) -> Option<String> {
    use rustls::CertificateError as Cert;
    let rustls::Error::InvalidCertificate(refused) = e else {
        return None;
    };
    Some(match refused {
        Cert::UnknownIssuer => format!(
            "the certificate of {server} is not signed by an authority this appliance trusts (self-signed, or a private CA)"
        ),
        Cert::NotValidForName | Cert::NotValidForNameContext { .. } => format!(
            "the certificate of {server} is not issued for {name}: use a name the certificate holds"
        ),
        Cert::Expired | Cert::ExpiredContext { .. } => {
            format!("the certificate of {server} has expired")
        }
        _ => format!("the certificate of {server} was refused: {e}"),
    })
}

/// The rustls error behind `e`, if TLS is what failed. It may sit inside an `io::Error`
/// (whose `source()` skips it) or an `Arc` (as the redis crate keeps its causes).
fn rustls_error<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e rustls::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tls) = c.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = c.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            return rustls_error(inner);
        }
        if let Some(shared) = c.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
            return rustls_error(shared.as_ref());
        }
        cause = c.source();
    }
    None
}

/// A random hex value for scratch records and probes.
fn nonce() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_scrubbed_as_written_and_decoded() {
        assert_eq!(
            url_password("mongodb://u:p%40ss@h1:1,h2:2/db"),
            Some("p%40ss")
        );
        assert_eq!(url_password("redis://:secret@host:6379/0"), Some("secret"));
        assert_eq!(url_password("redis://host:6379/0"), None);
        assert_eq!(url_password("mongodb://user@host/db"), None);
        let check = Check::failed(MONGO, "p%40ss and p@ss").redacted(Some("p%40ss"));
        assert_eq!(check.detail, "*** and ***");
        assert_eq!(check.to_string(), "KM_MONGO_URL: *** and ***");
    }

    #[test]
    fn checks_serialize_for_the_wizard() {
        let check = Check::warning(SITE, "could not reach it");
        assert_eq!(
            serde_json::to_value(&check).unwrap(),
            json!({"setting": "KM_SITE_URL", "status": "warning", "detail": "could not reach it"})
        );
    }
}
