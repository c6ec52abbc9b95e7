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

use bson::doc;
use elasticsearch::Elasticsearch;
use elasticsearch::http::Url;
use elasticsearch::indices::{IndicesDeleteIndexTemplateParts, IndicesPutIndexTemplateParts};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::{TcpStream, lookup_host};

use crate::gateway::certs;
use km_config::{SmtpSettings, SmtpTls, table};
use km_stores::{elastic, mongo, redis_bus};

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

/// An error's message followed by its causes (`error sending request: connection refused`).
fn with_causes(e: &(dyn StdError + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// An error from the stores' shared `open` functions, without its `SETTING: ` prefix
/// (the check names the setting itself).
fn without_setting(setting: &str, e: &anyhow::Error) -> String {
    let text = e.to_string();
    text.strip_prefix(setting)
        .and_then(|t| t.strip_prefix(": "))
        .map_or_else(|| text.clone(), str::to_string)
}

/// The user info of a URL (`scheme://user:password@host...`), if it has one.
fn url_userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    // The last '@' ends the user info: a raw '@' in a password is a common mistake.
    authority.rfind('@').map(|at| &authority[..at])
}

/// The password in a URL, if it has one (as written, maybe percent-encoded).
pub(crate) fn url_password(url: &str) -> Option<&str> {
    url_userinfo(url)?
        .split_once(':')
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty())
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

/// A random hex value for scratch records and probes.
fn nonce() -> String {
    hex::encode(rand::random::<[u8; 8]>())
}

// ---------------------------------------------------------------------------------------
// MongoDB
// ---------------------------------------------------------------------------------------

/// Connects to `KM_MONGO_URL`, pings, checks the version the driver needs, and writes,
/// reads and deletes a record in the scratch collection `km_setup_check`.
pub async fn check_mongo(url: &str) -> Check {
    bounded(MONGO, "MongoDB", mongo_steps(url))
        .await
        .redacted(url_password(url))
}

async fn mongo_steps(url: &str) -> Step<Check> {
    let (db, hosts) = mongo::open(url, TIMEOUT)
        .await
        .map_err(|e| Check::failed(MONGO, without_setting(MONGO, &e)))?;
    let unreachable = reach_any(MONGO, &hosts).await?;
    let failure = |doing: &str, e: mongodb::error::Error| {
        mongo_failure(&hosts, doing, &e, url_userinfo(url).is_some())
    };
    db.run_command(doc! {"ping": 1})
        .await
        .map_err(|e| failure("answer a ping", e))?;
    let info = db
        .run_command(doc! {"buildInfo": 1})
        .await
        .map_err(|e| failure("tell its version", e))?;
    let version = info.get_str("version").unwrap_or("unknown");
    mongo::supported_version(version).map_err(|e| Check::failed(MONGO, format!("{hosts} {e}")))?;
    let name = db.name().to_string();
    let scratch = db.collection::<bson::Document>(SCRATCH);
    let id = nonce();
    scratch
        .insert_one(doc! {"_id": &id, "at": bson::DateTime::now()})
        .await
        .map_err(|e| failure(&format!("write to {name}.{SCRATCH}"), e))?;
    let found = scratch
        .find_one(doc! {"_id": &id})
        .await
        .map_err(|e| failure(&format!("read {name}.{SCRATCH}"), e))?;
    scratch
        .delete_one(doc! {"_id": &id})
        .await
        .map_err(|e| failure(&format!("delete from {name}.{SCRATCH}"), e))?;
    if found.is_none() {
        return Err(Check::failed(
            MONGO,
            format!("{hosts} accepted a write to {name}.{SCRATCH} but did not return it"),
        ));
    }
    let detail =
        format!("MongoDB {version} at {hosts}, database {name}: write, read and delete work");
    Ok(ok_unless_unreachable(MONGO, detail, &unreachable))
}

/// A driver error as a failed check: wrong credentials, missing rights and an unusable
/// server each get their own words.
fn mongo_failure(hosts: &str, doing: &str, e: &mongodb::error::Error, with_user: bool) -> Check {
    use mongodb::error::ErrorKind;
    const AUTHENTICATION_FAILED: i32 = 18;
    const UNAUTHORIZED: i32 = 13;
    let detail = match e.kind.as_ref() {
        ErrorKind::Authentication { message, .. } => {
            format!("{hosts} refused the user name or password: {message}")
        }
        ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => {
            format!("{hosts} refused the user name or password: {}", c.message)
        }
        ErrorKind::Command(c) if c.code == UNAUTHORIZED && !with_user => format!(
            "{hosts} requires a user name and password to {doing}: put them in the URL (mongodb://USER:PASSWORD@host:port/km)"
        ),
        ErrorKind::Command(c) if c.code == UNAUTHORIZED => format!(
            "the user may not {doing}: {} (it needs the readWrite role on that database)",
            c.message
        ),
        ErrorKind::ServerSelection { message, .. } => format!(
            "no usable MongoDB server at {hosts} within {} s: {message}",
            TIMEOUT.as_secs()
        ),
        kind => format!("{hosts} did not {doing}: {kind}"),
    };
    Check::failed(MONGO, detail)
}

// ---------------------------------------------------------------------------------------
// Elasticsearch / OpenSearch
// ---------------------------------------------------------------------------------------

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
    let (client, hosts) = elastic::open(urls, TIMEOUT)
        .map_err(|e| Check::failed(ELASTIC, without_setting(ELASTIC, &e)))?;
    let unreachable = reach_any(ELASTIC, &hosts).await?;
    let info = elastic_info(&client, &hosts, urls).await?;
    elastic::supported_version(&info)
        .map_err(|e| Check::failed(ELASTIC, format!("{hosts} {e}")))?;
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

// ---------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------

/// Connects to `KM_REDIS_URL` (`redis://` or `rediss://`), authenticating if the URL
/// holds a password, checks the version (6 or newer), then sets, reads and deletes a
/// scratch key that expires on its own.
pub async fn check_redis(url: &str) -> Check {
    bounded(REDIS, "Redis", redis_steps(url))
        .await
        .redacted(url_password(url))
}

async fn redis_steps(url: &str) -> Step<Check> {
    let (client, host) =
        redis_bus::open(url).map_err(|e| Check::failed(REDIS, without_setting(REDIS, &e)))?;
    if let redis::ConnectionAddr::Tcp(name, port)
    | redis::ConnectionAddr::TcpTls {
        host: name, port, ..
    } = client.get_connection_info().addr()
    {
        reach(name, *port)
            .await
            .map_err(|why| Check::failed(REDIS, why))?;
    }
    let with_password = url_password(url).is_some();
    let failure =
        |doing: &str, e: redis::RedisError| redis_failure(&host, doing, &e, with_password);
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| failure("accept a connection", e))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| failure("answer PING", e))?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(|e| failure("tell its version (INFO server)", e))?;
    let version = redis_version(&info).unwrap_or("unknown");
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < REDIS_MIN_MAJOR) {
        return Err(Check::failed(
            REDIS,
            format!("{host} runs Redis {version}; {REDIS_MIN_MAJOR}.0 or newer is needed"),
        ));
    }
    scratch_key(&mut conn, &host, with_password).await?;
    Ok(Check::ok(
        REDIS,
        format!("Redis {version} at {host}: set, get and delete work"),
    ))
}

/// `redis_version:7.0.15` in the answer to `INFO server`.
fn redis_version(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
}

/// Sets a key that expires in a minute (left behind if the check dies), reads it back
/// and deletes it.
async fn scratch_key(
    conn: &mut redis::aio::MultiplexedConnection,
    host: &str,
    with_password: bool,
) -> Step<()> {
    let failure = |doing: &str, e: redis::RedisError| redis_failure(host, doing, &e, with_password);
    let (key, value) = (format!("{SCRATCH}:{}", nonce()), nonce());
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .arg("EX")
        .arg(60)
        .query_async(conn)
        .await
        .map_err(|e| failure("SET a scratch key", e))?;
    let read: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| failure("GET a scratch key", e))?;
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| failure("DEL a scratch key", e))?;
    if read.as_deref() != Some(value.as_str()) {
        return Err(Check::failed(
            REDIS,
            format!("{host} did not return the scratch key just set (a read-only replica?)"),
        ));
    }
    Ok(())
}

/// A Redis error as a failed check: a refused or missing password gets its own words.
fn redis_failure(host: &str, doing: &str, e: &redis::RedisError, with_password: bool) -> Check {
    let refused =
        e.kind() == redis::ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS");
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let tls_problem = rustls_error(e).map(|tls| {
        certificate_problem(host, name, tls)
            .unwrap_or_else(|| format!("TLS with {host} failed: {tls}"))
    });
    let detail = if let Some(problem) = tls_problem {
        problem
    } else if refused {
        format!("{host} refused the password (AUTH failed): check the password in the URL")
    } else if e.code() == Some("NOAUTH") && !with_password {
        format!(
            "{host} requires a password: put it in the URL (redis://:PASSWORD@host:port, or redis://USER:PASSWORD@ with an ACL user)"
        )
    } else if e.code() == Some("NOPERM") {
        format!("the user may not {doing} on {host}: {e}")
    } else if e.is_timeout() {
        format!("{host} did not {doing} within {} s", TIMEOUT.as_secs())
    } else {
        format!("{host} did not {doing}: {e}")
    };
    Check::failed(REDIS, detail)
}

// ---------------------------------------------------------------------------------------
// SMTP
// ---------------------------------------------------------------------------------------

/// What the SMTP check may trust besides the system's certificate authorities.
#[derive(Debug, Clone, Default)]
pub struct SmtpCheckOptions {
    /// A PEM CA certificate (or several) to trust too, for a server with a private CA.
    pub extra_ca_pem: Option<Vec<u8>>,
}

/// Connects to the SMTP server, secures the connection as `SMTP_TLS` says (STARTTLS is
/// required, not opportunistic), logs in if `SMTP_USER` is set, and with a recipient
/// sends a real test mail ("KM appliance test mail") and reports the server's answer.
pub async fn check_smtp(settings: &SmtpSettings, test_recipient: Option<&str>) -> Check {
    check_smtp_with(settings, test_recipient, &SmtpCheckOptions::default()).await
}

/// [`check_smtp`] with options (an extra trusted CA).
pub async fn check_smtp_with(
    settings: &SmtpSettings,
    test_recipient: Option<&str>,
    options: &SmtpCheckOptions,
) -> Check {
    bounded(
        SMTP_HOST,
        "the SMTP server",
        smtp_steps(settings, test_recipient, options),
    )
    .await
    .redacted(settings.password.as_deref())
}

/// The transport notifications go through: TLS per `SMTP_TLS` (rustls), login if a user
/// is set, every command bounded by [`TIMEOUT`].
pub fn smtp_transport(
    settings: &SmtpSettings,
    extra_ca_pem: Option<&[u8]>,
) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let tls_parameters = || {
        let mut builder = TlsParameters::builder(settings.host.clone());
        if let Some(pem) = extra_ca_pem {
            let ca = Certificate::from_pem(pem)
                .map_err(|e| format!("the extra CA certificate is not PEM: {e}"))?;
            builder = builder.add_root_certificate(ca);
        }
        builder
            .build_rustls()
            .map_err(|e| format!("cannot set up TLS: {}", with_causes(&e)))
    };
    let tls = match settings.tls {
        SmtpTls::None => Tls::None,
        SmtpTls::Starttls => Tls::Required(tls_parameters()?),
        SmtpTls::Tls => Tls::Wrapper(tls_parameters()?),
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
        .port(settings.port)
        .timeout(Some(TIMEOUT))
        .tls(tls);
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
    }
    Ok(builder.build())
}

async fn smtp_steps(
    settings: &SmtpSettings,
    recipient: Option<&str>,
    options: &SmtpCheckOptions,
) -> Step<Check> {
    let mail = recipient.map(|to| test_mail(settings, to)).transpose()?;
    let transport = smtp_transport(settings, options.extra_ca_pem.as_deref())
        .map_err(|e| Check::failed(SMTP_HOST, e))?;
    let server = format!("{}:{}", settings.host, settings.port);
    reach(&settings.host, settings.port)
        .await
        .map_err(|why| Check::failed(SMTP_HOST, why))?;
    let connected = transport
        .test_connection()
        .await
        .map_err(|e| smtp_failure(settings, &server, &e))?;
    if !connected {
        return Err(Check::failed(
            SMTP_HOST,
            format!("{server} did not answer NOOP"),
        ));
    }
    let how = smtp_connection_words(settings);
    let Some((mail, to)) = mail.zip(recipient) else {
        transport.shutdown().await;
        return Ok(Check::ok(SMTP_HOST, format!("connected to {server} {how}")));
    };
    let sent = transport.send(mail).await;
    transport.shutdown().await;
    let response = sent.map_err(|e| {
        Check::failed(
            SMTP_HOST,
            format!(
                "{server} refused the test mail to {to}: {}",
                with_causes(&e)
            ),
        )
    })?;
    let answer = response.message().collect::<Vec<_>>().join(" ");
    Ok(Check::ok(
        SMTP_HOST,
        format!(
            "connected to {server} {how}; it accepted the test mail to {to}: {} {answer}",
            response.code()
        ),
    ))
}

/// "with STARTTLS, logged in as km@example.com".
fn smtp_connection_words(settings: &SmtpSettings) -> String {
    let tls = match settings.tls {
        SmtpTls::None => "without TLS",
        SmtpTls::Starttls => "with STARTTLS",
        SmtpTls::Tls => "with TLS",
    };
    match &settings.user {
        Some(user) => format!("{tls}, logged in as {user}"),
        None => format!("{tls}, without login"),
    }
}

/// The test mail from `SMTP_SENDER` to `to`.
fn test_mail(settings: &SmtpSettings, to: &str) -> Step<Message> {
    let from: Mailbox = settings.sender.parse().map_err(|e| {
        Check::failed(
            SMTP_SENDER,
            format!("{:?} is not an email address: {e}", settings.sender),
        )
    })?;
    let to: Mailbox = to.parse().map_err(|e| {
        Check::failed(
            SMTP_HOST,
            format!("the test recipient {to:?} is not an email address: {e}"),
        )
    })?;
    Message::builder()
        .from(from)
        .to(to)
        .subject(TEST_MAIL_SUBJECT)
        .body(String::from(
            "This mail was sent by the KM appliance to check its SMTP settings. \
             Notifications will come from this address.\n",
        ))
        .map_err(|e| Check::failed(SMTP_HOST, format!("cannot build the test mail: {e}")))
}

/// An SMTP error as a failed check, naming the setting to change.
fn smtp_failure(
    settings: &SmtpSettings,
    server: &str,
    e: &lettre::transport::smtp::Error,
) -> Check {
    const AUTH_FAILED: u16 = 535;
    let text = with_causes(e);
    if let Some(tls) = rustls_error(e) {
        return smtp_tls_failure(settings, server, tls);
    }
    if e.status().map(u16::from) == Some(AUTH_FAILED) {
        return Check::failed(
            SMTP_PASSWORD,
            format!("{server} refused the user name or password: {text}"),
        );
    }
    if text.contains("STARTTLS is not supported") {
        return Check::failed(
            SMTP_TLS,
            format!(
                "{server} does not offer STARTTLS: use SMTP_TLS=tls if it is an SMTPS port (465), or none for a trusted local relay"
            ),
        );
    }
    if text.contains("No compatible authentication mechanism") {
        return Check::failed(
            SMTP_USER,
            format!("{server} offers no login this appliance can use (AUTH PLAIN or LOGIN)"),
        );
    }
    if e.is_timeout() {
        let hint = match settings.tls {
            SmtpTls::Tls => "",
            _ => ": if it is an SMTPS port (465), set SMTP_TLS=tls",
        };
        return Check::failed(
            SMTP_HOST,
            format!(
                "{server} did not answer within {} s{hint}",
                TIMEOUT.as_secs()
            ),
        );
    }
    Check::failed(SMTP_HOST, format!("{server}: {text}"))
}

/// A TLS failure: a refused certificate, or no TLS at all.
fn smtp_tls_failure(settings: &SmtpSettings, server: &str, e: &rustls::Error) -> Check {
    if let Some(problem) = certificate_problem(server, &settings.host, e) {
        return Check::failed(SMTP_HOST, problem);
    }
    if matches!(e, rustls::Error::InvalidMessage(_)) && settings.tls == SmtpTls::Tls {
        return Check::failed(
            SMTP_TLS,
            format!(
                "{server} does not speak TLS from the first byte: use SMTP_TLS=starttls if it is a submission port (587 or 25)"
            ),
        );
    }
    Check::failed(SMTP_HOST, format!("TLS with {server} failed: {e}"))
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

// ---------------------------------------------------------------------------------------
// site URL
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// TLS certificate and key files
// ---------------------------------------------------------------------------------------

/// Checks a PEM certificate chain and private key (`KM_TLS=files`): both parse, the key
/// belongs to the first certificate, the chain is in order, the certificate covers
/// `host` (the host of `KM_SITE_URL`) and is valid now (a warning if it expires within
/// 14 days: km does not renew files).
pub fn check_tls_files(cert_pem: &[u8], key_pem: &[u8], host: &str) -> Check {
    tls_files_steps(cert_pem, key_pem, host).unwrap_or_else(|failed| failed)
}

fn tls_files_steps(cert_pem: &[u8], key_pem: &[u8], host: &str) -> Step<Check> {
    let chain = certs::parse_chain(cert_pem).map_err(|e| Check::failed(TLS_CERT, e))?;
    let key = certs::parse_key(key_pem).map_err(|e| Check::failed(TLS_KEY, e))?;
    key_matches(&chain, &key)?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        Check::failed(
            TLS_CERT,
            format!("the first certificate cannot be used: {e}"),
        )
    })?;
    covers(&leaf, host)?;
    let now = UnixTime::now();
    valid_at(&leaf, &chain, now)?;
    let renew_by = now.as_secs().saturating_add(RENEW_WITHIN.as_secs());
    if let Some(end) = certs::not_after(&chain[0])
        && u64::try_from(end.unix).is_ok_and(|end| end < renew_by)
    {
        return Ok(Check::warning(
            TLS_CERT,
            format!(
                "the certificate for {host} expires at {}: renew it (km does not renew certificate files)",
                end.rfc3339
            ),
        ));
    }
    Ok(Check::ok(
        TLS_CERT,
        format!("the certificate is valid for {host} and matches the key"),
    ))
}

/// Whether `key` is the private half of the first certificate's public key.
fn key_matches(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'_>) -> Step<()> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| {
        Check::failed(
            TLS_KEY,
            format!("unsupported private key (RSA, ECDSA P-256/P-384 or Ed25519 are): {e}"),
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(Check::failed(
                TLS_KEY,
                "the private key does not belong to the certificate (the first one in KM_TLS_CERT)",
            ))
        }
        Err(e) => Err(Check::failed(
            TLS_KEY,
            format!("cannot tell whether the key belongs to the certificate: {e}"),
        )),
    }
}

/// Whether the certificate is issued for `host`.
fn covers(leaf: &webpki::EndEntityCert<'_>, host: &str) -> Step<()> {
    let name = ServerName::try_from(host)
        .map_err(|_| Check::failed(SITE, format!("{host:?} is not a host name")))?;
    if leaf.verify_is_valid_for_subject_name(&name).is_ok() {
        return Ok(());
    }
    let names: Vec<&str> = leaf.valid_dns_names().collect();
    let holds = if names.is_empty() {
        "no host name (no DNS name in its subjectAltName)".to_string()
    } else {
        names.join(", ")
    };
    Err(Check::failed(
        TLS_CERT,
        format!(
            "the certificate is not issued for {host} (the host of KM_SITE_URL): it names {holds}"
        ),
    ))
}

/// Whether the certificate (and its chain) is valid at `at`.
fn valid_at(
    leaf: &webpki::EndEntityCert<'_>,
    chain: &[CertificateDer<'static>],
    at: UnixTime,
) -> Step<()> {
    let detail = match verify(leaf, chain, at) {
        Ok(()) => return Ok(()),
        Err(webpki::Error::CertExpired { not_after, .. }) => {
            format!("the certificate expired on {}", date(not_after))
        }
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => format!(
            "the certificate is not valid before {} (is this machine's clock right?)",
            date(not_before)
        ),
        Err(webpki::Error::UnknownIssuer) => "the certificates are not a chain: put the server's certificate first, then the one that issued it, and so on".into(),
        Err(e) => format!("the certificate cannot be used: {e}"),
    };
    Err(Check::failed(TLS_CERT, detail))
}

/// Verifies the chain as given, at `at`: the file's last certificate stands in for the
/// trust anchor (whether a browser trusts it is the CA's business), so a lone
/// certificate only has its own validity and usage checked.
fn verify(
    leaf: &webpki::EndEntityCert<'_>,
    chain: &[CertificateDer<'static>],
    at: UnixTime,
) -> Result<(), webpki::Error> {
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let usage = webpki::KeyUsage::server_auth();
    let (anchors, intermediates) = match chain {
        [_, intermediates @ .., top] => {
            (vec![webpki::anchor_from_trusted_cert(top)?], intermediates)
        }
        _ => (Vec::new(), &[][..]),
    };
    match leaf.verify_for_usage(algorithms, &anchors, intermediates, at, usage, None, None) {
        Ok(_) => Ok(()),
        // Without an anchor, webpki checks the certificate itself, then finds no issuer.
        Err(webpki::Error::UnknownIssuer) if anchors.is_empty() => Ok(()),
        Err(e) => Err(e),
    }
}

/// `2026-01-31` for a certificate time.
fn date(at: UnixTime) -> String {
    let millis = i64::try_from(at.as_secs()).unwrap_or(i64::MAX / 1000) * 1000;
    bson::DateTime::from_millis(millis)
        .try_to_rfc3339_string()
        .ok()
        .and_then(|s| s.get(..10).map(str::to_string))
        .unwrap_or_else(|| format!("{} s after 1970", at.as_secs()))
}

#[cfg(test)]
mod tests {
    //! Every check against a real server started here on a free loopback port:
    //! SecantusDB (MongoDB wire, with SCRAM users), osmem-server (OpenSearch API, which
    //! has no authentication to test), redis-server, aiosmtpd (tests/support/smtp_server.py)
    //! and a small axum server for the site URL probe.

    use std::net::TcpListener;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;

    fn crypto() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    /// A loopback port nothing listens on.
    fn closed_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// A server process started here; killed (and reaped) on drop.
    struct Process {
        child: Child,
        port: u16,
    }

    impl Process {
        /// Starts `command` and waits until `port` accepts connections.
        fn start(command: &mut Command, port: u16) -> Process {
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
            let mut process = Process { child, port };
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = process.child.try_wait().unwrap() {
                    panic!("{command:?} exited at start ({status})");
                }
                assert!(
                    Instant::now() < deadline,
                    "{command:?} did not listen on {port}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            process
        }
    }

    impl Process {
        /// Stops it cleanly (SIGTERM), so that it saves what it holds.
        fn stop(mut self) {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }

    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn assert_status(check: &Check, status: Status, needle: &str) {
        eprintln!("{:?} {check}", check.status);
        assert_eq!(check.status, status, "{check}");
        assert!(
            check.detail.contains(needle),
            "{needle:?} missing from: {check}"
        );
    }

    // -- MongoDB ---------------------------------------------------------------------

    #[tokio::test]
    async fn mongo_good_url_passes_and_leaves_nothing_behind() {
        if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
            return;
        }
        let server = km_e2e::SecantusDb::start().unwrap();
        let url = server.url("km_check");
        let check = check_mongo(&url).await;
        assert_status(&check, Status::Ok, "write, read and delete work");
        assert!(check.detail.contains("database km_check"), "{check}");
        assert_eq!(check.setting, "KM_MONGO_URL");
        let client = mongodb::Client::with_uri_str(&url).await.unwrap();
        let left = client
            .database("km_check")
            .collection::<bson::Document>(SCRATCH)
            .count_documents(doc! {})
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn mongo_closed_port_is_connection_refused() {
        let port = closed_port();
        let check = check_mongo(&format!("mongodb://km:hunter2@127.0.0.1:{port}/km")).await;
        assert_status(
            &check,
            Status::Failed,
            &format!("cannot connect to 127.0.0.1:{port}: connection refused"),
        );
        assert!(!check.to_string().contains("hunter2"), "{check}");
    }

    #[tokio::test]
    async fn mongo_silent_server_times_out() {
        // Connections are accepted (the kernel's backlog) but nothing ever answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let started = Instant::now();
        let check = check_mongo(&format!("mongodb://127.0.0.1:{port}/km")).await;
        assert_status(&check, Status::Failed, "no usable MongoDB server");
        assert!(check.detail.contains("within 5 s"), "{check}");
        assert!(started.elapsed() < LIMIT, "took {:?}", started.elapsed());
    }

    /// SecantusDB with `--auth` and a user `km` / `right-pw` who may read and write the
    /// database `km_auth` only (users are created before auth is switched on).
    async fn secantus_with_user() -> (Process, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let secantus = |port: u16, auth: bool| {
            let mut command = Command::new("secantusd-py");
            command
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--storage-path")
                .arg(dir.path());
            if auth {
                command.arg("--auth");
            }
            Process::start(&mut command, port)
        };
        let open = secantus(closed_port(), false);
        let client = mongodb::Client::with_uri_str(format!("mongodb://127.0.0.1:{}/", open.port))
            .await
            .unwrap();
        client
            .database("km_auth")
            .run_command(doc! {
                "createUser": "km", "pwd": "right-pw",
                "roles": [{"role": "readWrite", "db": "km_auth"}],
            })
            .await
            .unwrap();
        drop(client);
        // A killed SecantusDB loses what it did not checkpoint: the user, here.
        open.stop();
        let guarded = secantus(closed_port(), true);
        (guarded, dir)
    }

    #[tokio::test]
    async fn mongo_credentials_and_rights_are_told_apart() {
        if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
            return;
        }
        let (server, _dir) = secantus_with_user().await;
        let url = |user: &str, db: &str| {
            format!(
                "mongodb://{user}127.0.0.1:{}/{db}?authSource=km_auth",
                server.port
            )
        };
        let good = check_mongo(&url("km:right-pw@", "km_auth")).await;
        assert_status(&good, Status::Ok, "write, read and delete work");

        let wrong = check_mongo(&url("km:wrong-pw@", "km_auth")).await;
        assert_status(&wrong, Status::Failed, "refused the user name or password");
        assert!(!wrong.to_string().contains("wrong-pw"), "{wrong}");

        let anonymous = check_mongo(&format!("mongodb://127.0.0.1:{}/km_auth", server.port)).await;
        assert_status(
            &anonymous,
            Status::Failed,
            "requires a user name and password",
        );

        let elsewhere = check_mongo(&url("km:right-pw@", "other")).await;
        assert_status(
            &elsewhere,
            Status::Failed,
            "the user may not write to other.km_setup_check",
        );
    }

    #[tokio::test]
    async fn mongo_version_rule_follows_the_driver() {
        assert!(mongo::supported_version("4.4.0").is_ok());
        assert!(mongo::supported_version("8.2.11").is_ok());
        let old = mongo::supported_version("4.2.24").unwrap_err();
        assert!(old.contains("4.4 or newer"), "{old}");
    }

    // -- Elasticsearch / OpenSearch ----------------------------------------------------

    #[tokio::test]
    async fn elasticsearch_good_url_passes_and_removes_its_template() {
        if !km_e2e::enabled("an Elasticsearch-API server (osmem-server)") {
            return;
        }
        let server = km_e2e::OsMem::start().unwrap();
        let urls = elastic::parse_urls(server.url()).unwrap();
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
        let urls =
            elastic::parse_urls(&format!("http://elastic:hunter2@127.0.0.1:{port}")).unwrap();
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
        assert!(elastic::supported_version(&es("7.10.2")).is_ok());
        assert!(elastic::supported_version(&es("8.15.0")).is_ok());
        assert!(elastic::supported_version(&es("7.9.3")).is_err());
        let opensearch = json!({"version": {"number": "1.3.0", "distribution": "opensearch"}});
        assert!(elastic::supported_version(&opensearch).is_ok());
    }

    // -- Redis -----------------------------------------------------------------------

    #[tokio::test]
    async fn redis_good_url_passes() {
        if !km_e2e::enabled("redis-server") {
            return;
        }
        let server = km_e2e::Redis::start().unwrap();
        let check = check_redis(&server.url()).await;
        assert_status(&check, Status::Ok, "set, get and delete work");
        assert!(
            check.detail.starts_with("Redis 7") || check.detail.starts_with("Redis 8"),
            "{check}"
        );
    }

    #[tokio::test]
    async fn redis_closed_port_is_connection_refused() {
        let port = closed_port();
        let check = check_redis(&format!("redis://:hunter2@127.0.0.1:{port}/")).await;
        assert_status(
            &check,
            Status::Failed,
            &format!("cannot connect to 127.0.0.1:{port}: connection refused"),
        );
        assert!(!check.to_string().contains("hunter2"), "{check}");
    }

    #[tokio::test]
    async fn redis_password_refused_or_missing() {
        if !km_e2e::enabled("redis-server") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = closed_port();
        let server = Process::start(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--requirepass",
                    "right-pw",
                ])
                .arg("--dir")
                .arg(dir.path()),
            port,
        );
        let url = |auth: &str| format!("redis://{auth}127.0.0.1:{}/", server.port);
        let wrong = check_redis(&url(":wrong-pw@")).await;
        assert_status(&wrong, Status::Failed, "refused the password");
        assert!(!wrong.to_string().contains("wrong-pw"), "{wrong}");
        let missing = check_redis(&url("")).await;
        assert_status(&missing, Status::Failed, "requires a password");
        let good = check_redis(&url(":right-pw@")).await;
        assert_status(&good, Status::Ok, "set, get and delete work");
    }

    #[tokio::test]
    async fn redis_over_tls_refuses_an_untrusted_certificate() {
        if !km_e2e::enabled("redis-server") {
            return;
        }
        crypto();
        let dir = tempfile::tempdir().unwrap();
        let pki = private_pki();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        let port = closed_port();
        let server = Process::start(
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&cert)
                .arg("--dir")
                .arg(dir.path()),
            port,
        );
        let untrusted = check_redis(&format!("rediss://127.0.0.1:{}/", server.port)).await;
        assert_status(
            &untrusted,
            Status::Failed,
            "not signed by an authority this appliance trusts",
        );
    }

    // -- SMTP ------------------------------------------------------------------------

    /// A private CA and a certificate it signed for 127.0.0.1 and localhost.
    struct Pki {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
    }

    fn private_pki() -> Pki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "KM test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
                .unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// aiosmtpd requiring AUTH as `km@example.com` / `right-pw`, mail to a Maildir.
    struct SmtpServer {
        process: Process,
        maildir: PathBuf,
        ca_pem: String,
        _dir: tempfile::TempDir,
    }

    fn smtp_server(mode: &str) -> SmtpServer {
        let dir = tempfile::tempdir().unwrap();
        let pki = private_pki();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        let maildir = dir.path().join("Maildir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/support/smtp_server.py");
        let port = closed_port();
        let process = Process::start(
            Command::new("python3")
                .arg(script)
                .args(["--port", &port.to_string(), "--mode", mode])
                .args(["--user", "km@example.com", "--password", "right-pw"])
                .arg("--maildir")
                .arg(&maildir)
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key),
            port,
        );
        SmtpServer {
            process,
            maildir,
            ca_pem: pki.ca_pem,
            _dir: dir,
        }
    }

    impl SmtpServer {
        fn settings(&self, tls: SmtpTls, password: &str) -> SmtpSettings {
            SmtpSettings {
                host: "127.0.0.1".into(),
                port: self.process.port,
                user: Some("km@example.com".into()),
                password: Some(password.into()),
                sender: "km@example.com".into(),
                tls,
            }
        }

        fn trusting(&self) -> SmtpCheckOptions {
            SmtpCheckOptions {
                extra_ca_pem: Some(self.ca_pem.as_bytes().to_vec()),
            }
        }

        /// The mails delivered so far.
        fn mails(&self) -> Vec<String> {
            std::fs::read_dir(self.maildir.join("new"))
                .map(|dir| {
                    dir.map(|f| std::fs::read_to_string(f.unwrap().path()).unwrap())
                        .collect()
                })
                .unwrap_or_default()
        }
    }

    #[tokio::test]
    async fn smtp_starttls_with_login_sends_the_test_mail() {
        if !km_e2e::enabled("an SMTP server (aiosmtpd)") {
            return;
        }
        let server = smtp_server("starttls");
        let settings = server.settings(SmtpTls::Starttls, "right-pw");
        let connected = check_smtp_with(&settings, None, &server.trusting()).await;
        assert_status(
            &connected,
            Status::Ok,
            "with STARTTLS, logged in as km@example.com",
        );
        assert!(server.mails().is_empty());

        let sent = check_smtp_with(&settings, Some("ops@example.com"), &server.trusting()).await;
        assert_status(
            &sent,
            Status::Ok,
            "it accepted the test mail to ops@example.com: 250",
        );
        let mails = server.mails();
        assert_eq!(mails.len(), 1, "{mails:?}");
        assert!(
            mails[0].contains("Subject: KM appliance test mail"),
            "{}",
            mails[0]
        );
        assert!(mails[0].contains("To: ops@example.com"), "{}", mails[0]);
        assert!(mails[0].contains("From: km@example.com"), "{}", mails[0]);
    }

    #[tokio::test]
    async fn smtp_wrong_password_is_named() {
        if !km_e2e::enabled("an SMTP server (aiosmtpd)") {
            return;
        }
        let server = smtp_server("starttls");
        let settings = server.settings(SmtpTls::Starttls, "wrong-pw");
        let check = check_smtp_with(&settings, Some("ops@example.com"), &server.trusting()).await;
        assert_status(&check, Status::Failed, "refused the user name or password");
        assert_eq!(check.setting, "SMTP_PASSWORD");
        assert!(check.detail.contains("535"), "{check}");
        assert!(!check.detail.contains("wrong-pw"), "{check}");
        assert!(server.mails().is_empty());
    }

    #[tokio::test]
    async fn smtp_untrusted_certificate_is_named() {
        if !km_e2e::enabled("an SMTP server (aiosmtpd)") {
            return;
        }
        let server = smtp_server("starttls");
        let settings = server.settings(SmtpTls::Starttls, "right-pw");
        let check = check_smtp(&settings, Some("ops@example.com")).await;
        assert_status(
            &check,
            Status::Failed,
            "is not signed by an authority this appliance trusts",
        );
        assert!(server.mails().is_empty());
    }

    #[tokio::test]
    async fn smtp_implicit_tls_and_mismatched_modes() {
        if !km_e2e::enabled("an SMTP server (aiosmtpd)") {
            return;
        }
        let smtps = smtp_server("tls");
        let settings = smtps.settings(SmtpTls::Tls, "right-pw");
        let sent = check_smtp_with(&settings, Some("ops@example.com"), &smtps.trusting()).await;
        assert_status(&sent, Status::Ok, "with TLS, logged in as km@example.com");
        assert_eq!(smtps.mails().len(), 1);

        let submission = smtp_server("starttls");
        let settings = submission.settings(SmtpTls::Tls, "right-pw");
        let check = check_smtp_with(&settings, None, &submission.trusting()).await;
        assert_status(
            &check,
            Status::Failed,
            "does not speak TLS from the first byte",
        );
        assert_eq!(check.setting, "SMTP_TLS");

        let plain = smtp_server("plain");
        let settings = plain.settings(SmtpTls::Starttls, "right-pw");
        let check = check_smtp_with(&settings, None, &plain.trusting()).await;
        assert_status(&check, Status::Failed, "does not offer STARTTLS");
        assert_eq!(check.setting, "SMTP_TLS");
    }

    #[tokio::test]
    async fn smtp_closed_port_is_connection_refused() {
        let port = closed_port();
        let settings = SmtpSettings {
            host: "127.0.0.1".into(),
            port,
            user: None,
            password: None,
            sender: "km@example.com".into(),
            tls: SmtpTls::Starttls,
        };
        let check = check_smtp(&settings, None).await;
        assert_status(&check, Status::Failed, "connection refused");
    }

    // -- site URL --------------------------------------------------------------------

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

    // -- TLS files -------------------------------------------------------------------

    /// A self-signed certificate for `names` valid until `not_after` (epoch seconds; by
    /// default far away), and its key.
    fn self_signed(names: &[&str], not_after: Option<u64>) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(at) = not_after {
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(at);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn now_s() -> u64 {
        UnixTime::now().as_secs()
    }

    #[test]
    fn tls_files_matching_pair_for_the_host_passes() {
        let (cert, key) = self_signed(&["km.test"], None);
        let check = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&check, Status::Ok, "valid for km.test and matches the key");
        let (cert, key) = self_signed(&["*.example.com"], None);
        let wildcard = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.example.com");
        assert_eq!(wildcard.status, Status::Ok, "{wildcard}");
    }

    #[test]
    fn tls_files_with_a_chain_in_order_pass_and_out_of_order_fail() {
        let pki = private_pki();
        let chain = format!("{}{}", pki.cert_pem, pki.ca_pem);
        let check = check_tls_files(chain.as_bytes(), pki.key_pem.as_bytes(), "localhost");
        assert_eq!(check.status, Status::Ok, "{check}");
        let (stranger, _) = self_signed(&["ca.test"], None);
        let broken = format!("{}{stranger}", pki.cert_pem);
        let check = check_tls_files(broken.as_bytes(), pki.key_pem.as_bytes(), "localhost");
        assert_status(&check, Status::Failed, "not a chain");
    }

    #[test]
    fn tls_files_mismatched_key_fails() {
        let (cert, _) = self_signed(&["km.test"], None);
        let (_, other_key) = self_signed(&["km.test"], None);
        let check = check_tls_files(cert.as_bytes(), other_key.as_bytes(), "km.test");
        assert_status(&check, Status::Failed, "does not belong to the certificate");
        assert_eq!(check.setting, "KM_TLS_KEY");
    }

    #[test]
    fn tls_files_for_another_host_fail_naming_what_they_hold() {
        let (cert, key) = self_signed(&["other.test", "www.other.test"], None);
        let check = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&check, Status::Failed, "not issued for km.test");
        assert!(
            check.detail.contains("other.test, www.other.test"),
            "{check}"
        );
    }

    #[test]
    fn tls_files_expired_fail_and_expiring_warn() {
        let (cert, key) = self_signed(&["km.test"], Some(now_s() - 86_400));
        let expired = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&expired, Status::Failed, "the certificate expired on");
        let (cert, key) = self_signed(&["km.test"], Some(now_s() + 3 * 86_400));
        let soon = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&soon, Status::Warning, "renew it");
    }

    #[test]
    fn tls_files_that_are_not_pem_fail() {
        let (cert, key) = self_signed(&["km.test"], None);
        let no_cert = check_tls_files(b"hello", key.as_bytes(), "km.test");
        assert_eq!(
            (no_cert.setting, no_cert.status),
            ("KM_TLS_CERT", Status::Failed)
        );
        let no_key = check_tls_files(cert.as_bytes(), cert.as_bytes(), "km.test");
        assert_eq!(
            (no_key.setting, no_key.status),
            ("KM_TLS_KEY", Status::Failed)
        );
    }

    // -- helpers ---------------------------------------------------------------------

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
