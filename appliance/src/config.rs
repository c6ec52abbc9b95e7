//! Settings of `km serve`, declared once: each has a flag, a `KM_*` variable and a
//! validation rule. Every problem is collected and reported together, naming the variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, FromArgMatches};

use crate::setup::licence::{self, Licence, LicenceError};
use elasticsearch::http::Url;
use km_stores::elastic::parse_urls;

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
    #[arg(
        long,
        env = "KM_ELASTICSEARCH_HOST",
        hide = true,
        hide_env_values = true
    )]
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
    /// The licence: a signed licence text (see `km::setup::licence`).
    #[arg(long, env = "KM_DEDICATED_KEY", hide_env_values = true)]
    pub dedicated_key: Option<String>,
    /// SMTP server for notifications: `host` or `host:port` (unset: no mail).
    #[arg(long, env = "SMTP_HOST")]
    pub smtp_host: Option<String>,
    /// SMTP port (default: 465 with `SMTP_TLS=tls`, 587 with `starttls`, 25 with `none`).
    #[arg(long, env = "SMTP_PORT")]
    pub smtp_port: Option<String>,
    #[arg(long, env = "SMTP_USER")]
    pub smtp_user: Option<String>,
    #[arg(long, env = "SMTP_PASSWORD", hide_env_values = true)]
    pub smtp_password: Option<String>,
    /// The From address of notifications.
    #[arg(long, env = "SMTP_SENDER")]
    pub smtp_sender: Option<String>,
    /// `none`, `starttls` (default) or `tls`.
    #[arg(long, env = "SMTP_TLS", default_value = "starttls")]
    pub smtp_tls: String,
    /// HTTPS: `off` (plain HTTP), `acme` (certificate from an ACME CA for KM_SITE_URL's
    /// host) or `files` (KM_TLS_CERT and KM_TLS_KEY).
    #[arg(long, env = "KM_TLS", default_value = "off")]
    pub tls: String,
    /// Address of the HTTPS port when KM_TLS is not `off` (KM_LISTEN then redirects to it).
    #[arg(long, env = "KM_HTTPS_LISTEN", default_value = "0.0.0.0:443")]
    pub https_listen: String,
    /// PEM certificate chain (KM_TLS=files).
    #[arg(long, env = "KM_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (KM_TLS=files).
    #[arg(long, env = "KM_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// ACME directory (KM_TLS=acme).
    #[arg(
        long,
        env = "KM_ACME_DIRECTORY",
        default_value = "https://acme-v02.api.letsencrypt.org/directory"
    )]
    pub acme_directory: String,
    /// Contact address given to the ACME CA.
    #[arg(long, env = "KM_ACME_EMAIL")]
    pub acme_email: Option<String>,
    /// PEM file of the CA that signs the ACME directory's HTTPS certificate, for a
    /// private CA (default: the system's CAs).
    #[arg(long, env = "KM_ACME_CA")]
    pub acme_ca: Option<PathBuf>,
    /// The setup wizard's local address (`http://127.0.0.1:8090`): `/wizard/` on km's
    /// ports is passed to it, so admins reach it through the site URL.
    #[arg(long, env = "KM_WIZARD_URL")]
    pub wizard_url: Option<String>,
    /// Address of the api role (`km serve --role api`); the gateway forwards `/api` and
    /// the dashboard there.
    #[arg(long, env = "KM_API_LISTEN", default_value = "127.0.0.1:3010")]
    pub api_listen: String,
    /// Address of the auth role; the gateway forwards `/api/oauth` there.
    #[arg(long, env = "KM_AUTH_LISTEN", default_value = "127.0.0.1:3100")]
    pub auth_listen: String,
    /// Address of the realtime role; the gateway forwards `/primus` there.
    #[arg(long, env = "KM_REALTIME_LISTEN", default_value = "127.0.0.1:4010")]
    pub realtime_listen: String,
    /// Address of the interactor role; the gateway forwards `/interaction` there.
    #[arg(long, env = "KM_INTERACTOR_LISTEN", default_value = "127.0.0.1:3900")]
    pub interactor_listen: String,
    /// Where the workers write a backup every KM_BACKUP_HOURS (unset: no scheduled
    /// backups).
    #[arg(long, env = "KM_BACKUP_DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Hours between scheduled backups.
    #[arg(long, env = "KM_BACKUP_HOURS", default_value = "24")]
    pub backup_hours: String,
    /// Backups kept in KM_BACKUP_DIR (the oldest go).
    #[arg(long, env = "KM_BACKUP_KEEP", default_value = "7")]
    pub backup_keep: String,
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
            dedicated_key: None,
            smtp_host: None,
            smtp_port: None,
            smtp_user: None,
            smtp_password: None,
            smtp_sender: None,
            smtp_tls: "starttls".into(),
            tls: "off".into(),
            https_listen: "0.0.0.0:443".into(),
            tls_cert: None,
            tls_key: None,
            acme_directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            acme_email: None,
            acme_ca: None,
            wizard_url: None,
            api_listen: "127.0.0.1:3010".into(),
            auth_listen: "127.0.0.1:3100".into(),
            realtime_listen: "127.0.0.1:4010".into(),
            interactor_listen: "127.0.0.1:3900".into(),
            backup_dir: None,
            backup_hours: "24".into(),
            backup_keep: "7".into(),
        }
    }
}

/// How `KM_REDIS_URL` may start: TCP, TLS, or a Unix socket (the appliance's local bus).
const REDIS_SCHEMES: [&str; 3] = ["redis://", "rediss://", "redis+unix://"];

/// Variables an env file may set that are read elsewhere than [`RawSettings`].
const OTHER_VARIABLES: &[&str] = &["KM_LOG"];

/// The prefixes of the appliance's own variables: an unknown one is a typo.
const OWN_PREFIXES: &[&str] = &["KM_", "SMTP_"];

impl RawSettings {
    /// The settings as clap declares them (flag, variable, default): the one declaration.
    fn command() -> clap::Command {
        RawSettings::augment_args(clap::Command::new("km"))
    }

    /// `(variable, flag)` of every setting.
    pub fn variables() -> Vec<(String, String)> {
        Self::command()
            .get_arguments()
            .filter_map(|a| {
                Some((
                    a.get_env()?.to_str()?.to_string(),
                    a.get_long()?.to_string(),
                ))
            })
            .collect()
    }

    /// The settings an env file gives, read as `km serve` reads the same variables from
    /// its environment (same names, same defaults). Unknown `KM_*`/`SMTP_*` names are
    /// errors; other names (`PATH`...) are not the appliance's and are ignored.
    pub fn from_env_map(map: &BTreeMap<String, String>) -> Result<Self, ConfigErrors> {
        let unknown = Self::unknown_variables(map);
        let raw = Self::from_known_variables(map)?;
        if unknown.is_empty() {
            Ok(raw)
        } else {
            Err(ConfigErrors(unknown))
        }
    }

    /// Parses `--flag=value` for each variable in `map` with the declarations stripped of
    /// their variables, so the process environment is not read.
    fn from_known_variables(map: &BTreeMap<String, String>) -> Result<Self, ConfigErrors> {
        let args = Self::variables()
            .into_iter()
            .filter_map(|(var, flag)| map.get(&var).map(|value| format!("--{flag}={value}")));
        let clap_error = |e: clap::Error| ConfigErrors(vec![e.to_string()]);
        let matches = Self::command()
            .mut_args(|a| a.env(None::<&'static str>))
            .try_get_matches_from(std::iter::once("km".to_string()).chain(args))
            .map_err(clap_error)?;
        Self::from_arg_matches(&matches).map_err(clap_error)
    }

    /// One error per unknown `KM_*`/`SMTP_*` name in `map`, with the likely intended name.
    fn unknown_variables(map: &BTreeMap<String, String>) -> Vec<String> {
        let known: Vec<String> = Self::variables()
            .into_iter()
            .map(|(var, _)| var)
            .chain(OTHER_VARIABLES.iter().map(|v| v.to_string()))
            .collect();
        map.keys()
            .filter(|k| OWN_PREFIXES.iter().any(|p| k.starts_with(p)) && !known.contains(k))
            .map(|k| match closest(k, &known) {
                Some(near) => format!("{k}: not a setting of km (did you mean {near}?)"),
                None => format!("{k}: not a setting of km"),
            })
            .collect()
    }
}

/// The name of `known` nearest to `name` by edit distance, if near enough to be a typo.
fn closest<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.as_str())
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
    /// The licence text (`KM_DEDICATED_KEY`), checked by the limit worker.
    pub dedicated_key: Option<String>,
    /// Where notifications are sent from; `None` without `SMTP_HOST`.
    pub smtp: Option<SmtpSettings>,
    pub tls: TlsMode,
    pub https_listen: SocketAddr,
    /// Where `/wizard/` is passed to (`KM_WIZARD_URL`), without trailing slash.
    pub wizard_url: Option<String>,
    /// Where each role listens when it runs on its own (`km serve --role ...`).
    pub roles: RoleAddresses,
    /// Scheduled backups (`KM_BACKUP_DIR`), if any.
    pub backups: Option<BackupSchedule>,
}

/// Backups the workers make by themselves.
#[derive(Debug, Clone)]
pub struct BackupSchedule {
    pub dir: PathBuf,
    pub every: std::time::Duration,
    /// Archives kept in `dir`.
    pub keep: usize,
}

/// The addresses of the roles that have a port of their own when run apart; the gateway
/// forwards to them.
#[derive(Debug, Clone, Copy)]
pub struct RoleAddresses {
    pub api: SocketAddr,
    pub auth: SocketAddr,
    pub realtime: SocketAddr,
    pub interactor: SocketAddr,
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (a local relay only).
    None,
    /// Plain, then upgraded with STARTTLS (required, not opportunistic).
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

#[derive(Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub sender: String,
    pub tls: SmtpTls,
}

/// Never prints the password.
impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sender", &self.sender)
            .field("tls", &self.tls)
            .finish()
    }
}

/// How the gateway serves HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain HTTP on `KM_LISTEN` (behind a TLS proxy, or for a trial).
    Off,
    /// A certificate and key given as PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// A certificate for the site URL's host from an ACME CA (HTTP-01), renewed by km.
    Acme {
        directory: String,
        email: Option<String>,
        ca: Option<PathBuf>,
    },
}

/// All problems found in the settings, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl Settings {
    pub fn from_raw(raw: RawSettings) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let mut address = |value: &str, var: &str, example: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|e| {
                    errors.push(format!(
                        "{var}: {value:?} is not an address like {example}: {e}"
                    ))
                })
                .ok()
        };
        let listen = address(&raw.listen, "KM_LISTEN (--listen)", "127.0.0.1:8080");
        let https_listen = address(
            &raw.https_listen,
            "KM_HTTPS_LISTEN (--https-listen)",
            "0.0.0.0:443",
        );
        let roles = match (
            address(
                &raw.api_listen,
                "KM_API_LISTEN (--api-listen)",
                "127.0.0.1:3010",
            ),
            address(
                &raw.auth_listen,
                "KM_AUTH_LISTEN (--auth-listen)",
                "127.0.0.1:3100",
            ),
            address(
                &raw.realtime_listen,
                "KM_REALTIME_LISTEN (--realtime-listen)",
                "127.0.0.1:4010",
            ),
            address(
                &raw.interactor_listen,
                "KM_INTERACTOR_LISTEN (--interactor-listen)",
                "127.0.0.1:3900",
            ),
        ) {
            (Some(api), Some(auth), Some(realtime), Some(interactor)) => Some(RoleAddresses {
                api,
                auth,
                realtime,
                interactor,
            }),
            _ => None,
        };
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
            && !url.is_empty()
            && !(url.starts_with("mongodb://") || url.starts_with("mongodb+srv://"))
        {
            // The value may hold a password: it is not repeated.
            errors.push(
                "KM_MONGO_URL (--mongo-url): must start with mongodb:// or mongodb+srv://".into(),
            );
        }
        if let Some(url) = &raw.redis_url
            && !url.is_empty()
            && !REDIS_SCHEMES.iter().any(|scheme| url.starts_with(scheme))
        {
            errors.push(
                "KM_REDIS_URL (--redis-url): must start with redis:// (rediss:// for TLS, redis+unix:// for a local socket)"
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
        let smtp = smtp_settings(&raw, &mut errors);
        let wizard_url = raw
            .wizard_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .and_then(|url| match url.strip_prefix("http://") {
                Some(_) => Some(url.trim_end_matches('/').to_string()),
                None => {
                    errors.push(format!(
                        "KM_WIZARD_URL: {url:?} must be the wizard's local http:// address"
                    ));
                    None
                }
            });
        let tls = tls_mode(&raw, site_url.as_deref(), &mut errors);
        let backups = backup_schedule(&raw, &mut errors);
        match (listen, retention_days, logs_retention_days, allow_signup) {
            (Some(listen), Some(retention_days), Some(logs_retention_days), Some(allow_signup))
                if errors.is_empty()
                    && let (Some(tls), Some(https_listen), Some(roles)) =
                        (tls, https_listen, roles) =>
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
                    dedicated_key: raw.dedicated_key.filter(|k| !k.trim().is_empty()),
                    smtp,
                    tls,
                    https_listen,
                    wizard_url,
                    roles,
                    backups,
                })
            }
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// The settings of an env file: unknown variables and invalid values, all reported.
    pub fn from_env_map(map: &BTreeMap<String, String>) -> Result<Self, ConfigErrors> {
        let mut errors = RawSettings::unknown_variables(map);
        let checked = RawSettings::from_known_variables(map).and_then(Settings::from_raw);
        match checked {
            Ok(settings) if errors.is_empty() => Ok(settings),
            Ok(_) => Err(ConfigErrors(errors)),
            Err(ConfigErrors(more)) => {
                errors.extend(more);
                Err(ConfigErrors(errors))
            }
        }
    }

    /// The licence (`KM_DEDICATED_KEY`) verified at `now_s` (epoch seconds); `None` if unset.
    pub fn licence(&self, now_s: i64) -> Option<Result<Licence, LicenceError>> {
        self.dedicated_key
            .as_deref()
            .map(|text| licence::verify(text, now_s))
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

/// The SMTP settings, if `SMTP_HOST` is set: a sender is then required, the port comes
/// from `SMTP_PORT`, `host:port` or the TLS mode.
fn smtp_settings(raw: &RawSettings, errors: &mut Vec<String>) -> Option<SmtpSettings> {
    let tls = match raw.smtp_tls.trim() {
        "none" => SmtpTls::None,
        "starttls" | "" => SmtpTls::Starttls,
        "tls" | "ssl" => SmtpTls::Tls,
        other => {
            errors.push(format!("SMTP_TLS: {other:?} is not none, starttls or tls"));
            SmtpTls::Starttls
        }
    };
    let given = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let host = given(&raw.smtp_host)?;
    let (host, port_in_host) = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p.to_string())),
        _ => (host, None),
    };
    let default_port = match tls {
        SmtpTls::None => 25,
        SmtpTls::Starttls => 587,
        SmtpTls::Tls => 465,
    };
    let port = match given(&raw.smtp_port).or(port_in_host) {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                errors.push(format!("SMTP_PORT: {p:?} is not a port number"));
                default_port
            }
        },
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        errors.push(format!("SMTP_HOST: {host:?} is not a host name"));
    }
    let sender = given(&raw.smtp_sender).unwrap_or_default();
    if !looks_like_email(&sender) {
        errors.push(format!(
            "SMTP_SENDER: {sender:?} is not an email address (required with SMTP_HOST)"
        ));
    }
    let (user, password) = (given(&raw.smtp_user), given(&raw.smtp_password));
    if user.is_some() != password.is_some() {
        errors.push("SMTP_USER and SMTP_PASSWORD: give both, or neither".into());
    }
    Some(SmtpSettings {
        host,
        port,
        user,
        password,
        sender,
        tls,
    })
}

/// `name@domain.tld`, roughly: what a mail server would accept as an address.
pub fn looks_like_email(address: &str) -> bool {
    address.len() <= 254
        && !address.contains(char::is_whitespace)
        && address.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty() && domain.contains('.') && !domain.starts_with('.')
        })
}

/// `KM_BACKUP_DIR` with its period and how many are kept; `None` when unset.
fn backup_schedule(raw: &RawSettings, errors: &mut Vec<String>) -> Option<BackupSchedule> {
    let mut whole = |value: &str, var: &str, what: &str| match value.trim().parse::<u32>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            errors.push(format!(
                "{var}: {value:?} is not a whole number of {what} above 0"
            ));
            None
        }
    };
    let hours = whole(
        &raw.backup_hours,
        "KM_BACKUP_HOURS (--backup-hours)",
        "hours",
    );
    let keep = whole(
        &raw.backup_keep,
        "KM_BACKUP_KEEP (--backup-keep)",
        "backups",
    );
    let dir = raw
        .backup_dir
        .clone()
        .filter(|d| !d.as_os_str().is_empty())?;
    if dir.is_relative() {
        errors.push(format!(
            "KM_BACKUP_DIR (--backup-dir): {} must be an absolute path",
            dir.display()
        ));
        return None;
    }
    Some(BackupSchedule {
        dir,
        every: std::time::Duration::from_secs(u64::from(hours?) * 3600),
        keep: usize::try_from(keep?).unwrap_or(usize::MAX),
    })
}

/// The HTTPS mode; `acme` needs an https `KM_SITE_URL` (its host gets the certificate).
fn tls_mode(
    raw: &RawSettings,
    site_url: Option<&str>,
    errors: &mut Vec<String>,
) -> Option<TlsMode> {
    match raw.tls.trim() {
        "off" | "" => Some(TlsMode::Off),
        "files" => match (&raw.tls_cert, &raw.tls_key) {
            (Some(cert), Some(key)) => Some(TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => {
                errors.push(
                    "KM_TLS=files: KM_TLS_CERT and KM_TLS_KEY (PEM files) are required".into(),
                );
                None
            }
        },
        "acme" => {
            if !site_url.is_some_and(|u| u.starts_with("https://")) {
                errors.push("KM_TLS=acme: KM_SITE_URL must be the https:// URL whose host gets the certificate".into());
                return None;
            }
            if let Some(email) = &raw.acme_email
                && !looks_like_email(email)
            {
                errors.push(format!("KM_ACME_EMAIL: {email:?} is not an email address"));
            }
            if !raw.acme_directory.starts_with("https://") {
                errors.push(format!(
                    "KM_ACME_DIRECTORY: {:?} must be an https:// URL",
                    raw.acme_directory
                ));
            }
            Some(TlsMode::Acme {
                directory: raw.acme_directory.clone(),
                email: raw.acme_email.clone(),
                ca: raw.acme_ca.clone(),
            })
        }
        other => {
            errors.push(format!("KM_TLS: {other:?} is not off, acme or files"));
            None
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

    fn map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_map_defaults_are_the_flags_defaults() {
        let raw = RawSettings::from_env_map(&map(&[("KM_DATA_DIR", "./d")])).unwrap();
        assert_eq!(
            format!("{raw:?}"),
            format!("{:?}", RawSettings::with_data_dir("./d"))
        );
    }

    #[test]
    fn env_map_fills_every_variable() {
        let vars = RawSettings::variables();
        assert!(vars.len() >= 25, "{vars:?}");
        let all: BTreeMap<String, String> = vars
            .iter()
            .map(|(var, _)| (var.clone(), format!("-{var}= x")))
            .collect();
        let debug = format!("{:?}", RawSettings::from_env_map(&all).unwrap());
        for (var, _) in &vars {
            assert!(
                debug.contains(&format!("\"-{var}= x\"")),
                "{var} not read: {debug}"
            );
        }
    }

    #[test]
    fn env_map_values_are_validated_like_the_environment() {
        let s = Settings::from_env_map(&map(&[
            ("KM_LISTEN", "0.0.0.0:80"),
            ("KM_SITE_URL", "https://km.example.com/"),
            ("KM_ELASTICSEARCH_HOST", "es1:9200"),
            ("KM_MONGO_URL", ""),
            ("SMTP_HOST", "smtp.example.com:2525"),
            ("SMTP_SENDER", "km@example.com"),
            ("KM_LOG", "debug"),
            ("PATH", "/usr/bin"),
        ]))
        .unwrap();
        assert_eq!(s.listen, "0.0.0.0:80".parse().unwrap());
        assert_eq!(s.site_url.as_deref(), Some("https://km.example.com"));
        assert_eq!(s.elasticsearch.len(), 1);
        assert_eq!(s.mongo_url, None);
        assert_eq!(s.smtp.map(|m| m.port), Some(2525));
        assert_eq!(s.retention_days, 30);
    }

    #[test]
    fn env_map_reports_typos_with_the_other_errors() {
        let vars = map(&[
            ("KM_SITEURL", "https://km.example.com"),
            ("SMTP_HOTS", "smtp"),
            ("KM_WHATEVER_THIS_IS", "1"),
            ("KM_LISTEN", "nope"),
        ]);
        let err = RawSettings::from_env_map(&vars).unwrap_err().0;
        assert_eq!(
            err,
            [
                "KM_SITEURL: not a setting of km (did you mean KM_SITE_URL?)",
                "KM_WHATEVER_THIS_IS: not a setting of km",
                "SMTP_HOTS: not a setting of km (did you mean SMTP_HOST?)",
            ]
        );
        let err = Settings::from_env_map(&vars).unwrap_err().0;
        assert_eq!(err.len(), 4, "{err:?}");
        assert!(err[3].starts_with("KM_LISTEN"), "{err:?}");
    }

    #[test]
    fn licence_is_verified_on_demand() {
        assert!(Settings::from_raw(raw()).unwrap().licence(0).is_none());
        let s = Settings::from_raw(RawSettings {
            dedicated_key: Some("not-a-licence".into()),
            ..raw()
        })
        .unwrap();
        assert_eq!(s.licence(0), Some(Err(LicenceError::NotKm)));
    }

    #[test]
    fn a_mistyped_name_finds_the_nearest_setting() {
        let known = ["KM_SITE_URL".to_string(), "SMTP_HOST".to_string()];
        assert_eq!(closest("KM_SITEURL", &known), Some("KM_SITE_URL"));
        assert_eq!(closest("SMTP_HOTS", &known), Some("SMTP_HOST"));
        assert_eq!(closest("KM_NOTHING_LIKE_IT", &known), None);
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
