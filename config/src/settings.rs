//! The settings' values as given (flags, environment or an env file) and their checked,
//! typed form. Every problem is collected and reported together, naming the variable.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgMatches, Args, FromArgMatches};
use elasticsearch::http::Url;
use km_stores::elastic::parse_urls;

use crate::licence::{self, Licence, LicenceError};
use crate::table::{self, Kind, Secret, Setting};

/// The values given to the settings, not yet checked; a setting not given reads as its
/// default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values(BTreeMap<&'static str, String>);

impl Values {
    /// The defaults with the given data dir (what `km serve --data-dir DIR` reads without
    /// environment), for tests and benchmarks.
    pub fn with_data_dir(data_dir: impl AsRef<Path>) -> Self {
        let mut values = Values::default();
        values.set(&table::DATA_DIR, data_dir.as_ref().display().to_string());
        values
    }

    pub fn set(&mut self, setting: &'static Setting, value: impl Into<String>) {
        self.0.insert(setting.var, value.into());
    }

    /// The value given, else the default; `None` when neither (an empty value is unset).
    pub fn get(&self, setting: &Setting) -> Option<&str> {
        setting.read(self.0.get(setting.var).map(String::as_str))
    }

    /// The values an env file gives. Unknown `KM_*`/`SMTP_*` names are errors; other
    /// names (`PATH`...) are not the appliance's and are ignored.
    pub fn from_env_map(map: &BTreeMap<String, String>) -> Result<Self, ConfigErrors> {
        let unknown = unknown_variables(map);
        if unknown.is_empty() {
            Ok(Self::known(map))
        } else {
            Err(ConfigErrors(unknown))
        }
    }

    fn known(map: &BTreeMap<String, String>) -> Self {
        Values(
            table::ALL
                .iter()
                .filter_map(|s| Some((s.var, map.get(s.var)?.clone())))
                .collect(),
        )
    }
}

/// `km serve`'s flags, each also read from its variable, from the table.
impl Args for Values {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        table::ALL.iter().fold(cmd, |cmd, s| {
            let arg = Arg::new(s.var)
                .long(s.flag)
                .value_name(s.kind.placeholder())
                .env(s.var)
                .help(s.help)
                .hide(s.hidden)
                .hide_env_values(s.secret != Secret::No);
            cmd.arg(match s.default {
                Some(default) => arg.default_value(default),
                None => arg,
            })
        })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for Values {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut values = Values::default();
        values.update_from_arg_matches(matches)?;
        Ok(values)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        for s in table::ALL {
            let value = matches.try_get_one::<String>(s.var).map_err(|e| {
                clap::Error::raw(
                    clap::error::ErrorKind::InvalidValue,
                    format!("{}: {e}", s.var),
                )
            })?;
            if let Some(value) = value {
                self.0.insert(s.var, value.clone());
            }
        }
        Ok(())
    }
}

/// One error per unknown `KM_*`/`SMTP_*` name in `map`, with the likely intended name.
fn unknown_variables(map: &BTreeMap<String, String>) -> Vec<String> {
    let known: Vec<&str> = table::ALL
        .iter()
        .map(|s| s.var)
        .chain([table::LOG])
        .collect();
    map.keys()
        .filter(|k| table::OWN_PREFIXES.iter().any(|p| k.starts_with(p)))
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| match closest(k, &known) {
            Some(near) => format!("{k}: not a setting of km (did you mean {near}?)"),
            None => format!("{k}: not a setting of km"),
        })
        .collect()
}

/// The name of `known` nearest to `name` by edit distance, if near enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
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
    pub workers: SocketAddr,
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
    /// The values checked: every problem reported together.
    pub fn from_values(values: &Values) -> Result<Self, ConfigErrors> {
        let mut c = Checker {
            values,
            errors: Vec::new(),
        };
        let listen = c.address(&table::LISTEN);
        let https_listen = c.address(&table::HTTPS_LISTEN);
        let roles = RoleAddresses {
            api: c.address(&table::API_LISTEN),
            auth: c.address(&table::AUTH_LISTEN),
            realtime: c.address(&table::REALTIME_LISTEN),
            interactor: c.address(&table::INTERACTOR_LISTEN),
            workers: c.address(&table::WORKERS_LISTEN),
        };
        let site_url = c.url(&table::SITE_URL).map(without_trailing_slash);
        let retention_days = c.count(&table::RETENTION_DAYS);
        let logs_retention_days = match values.get(&table::LOGS_RETENTION_DAYS) {
            Some(_) => c.count(&table::LOGS_RETENTION_DAYS),
            None => retention_days,
        };
        let mongo_url = c.url(&table::MONGO_URL);
        let redis_url = c.url(&table::REDIS_URL);
        let elasticsearch = c
            .nodes(&table::ELASTICSEARCH_URL)
            .or_else(|| c.nodes(&table::ELASTICSEARCH_HOST))
            .unwrap_or_default();
        let elasticsearch_prefix = c.text(&table::ELASTICSEARCH_PREFIX).unwrap_or_default();
        if !elasticsearch_prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            c.fail(
                &table::ELASTICSEARCH_PREFIX,
                format!("{elasticsearch_prefix:?} must be lowercase letters, digits or '_'"),
            );
        }
        let allow_signup = c.switch(&table::ALLOW_SIGNUP);
        let wizard_url = c.url(&table::WIZARD_URL).map(without_trailing_slash);
        let smtp = smtp_settings(&mut c);
        let tls = tls_mode(&mut c, site_url.as_deref());
        let backups = backup_schedule(&mut c);
        let data_dir = c.path(&table::DATA_DIR).unwrap_or_default();
        let dedicated_key = c.text(&table::DEDICATED_KEY);
        if !c.errors.is_empty() {
            return Err(ConfigErrors(c.errors));
        }
        Ok(Settings {
            listen,
            data_dir,
            site_url,
            mongo_url,
            redis_url,
            elasticsearch,
            elasticsearch_prefix,
            retention_days,
            logs_retention_days,
            allow_signup,
            dedicated_key,
            smtp,
            tls,
            https_listen,
            wizard_url,
            roles,
            backups,
        })
    }

    /// The settings of an env file: unknown variables and invalid values, all reported.
    pub fn from_env_map(map: &BTreeMap<String, String>) -> Result<Self, ConfigErrors> {
        let mut errors = unknown_variables(map);
        match Settings::from_values(&Values::known(map)) {
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

/// Reads each value as its setting's kind says, collecting one error per bad value. A
/// setting with a default that does not read gets a placeholder: with an error
/// recorded, no [`Settings`] is made of it.
struct Checker<'a> {
    values: &'a Values,
    errors: Vec<String>,
}

impl Checker<'_> {
    fn fail(&mut self, s: &Setting, why: impl std::fmt::Display) {
        self.errors.push(format!("{}: {why}", s.named()));
    }

    fn text(&self, s: &Setting) -> Option<String> {
        self.values.get(s).map(str::to_string)
    }

    fn path(&self, s: &Setting) -> Option<PathBuf> {
        debug_assert_eq!(s.kind, Kind::Path, "{}", s.var);
        self.values.get(s).map(PathBuf::from)
    }

    fn address(&mut self, s: &Setting) -> SocketAddr {
        debug_assert_eq!(s.kind, Kind::Address, "{}", s.var);
        let value = self.values.get(s).unwrap_or_default();
        value.parse().unwrap_or_else(|e| {
            let example = s.default.unwrap_or("127.0.0.1:8080");
            self.fail(
                s,
                format!("{value:?} is not an address like {example}: {e}"),
            );
            SocketAddr::from(([0, 0, 0, 0], 0))
        })
    }

    fn count(&mut self, s: &Setting) -> u32 {
        let Kind::Count(unit) = s.kind else {
            unreachable!("{} is not a count", s.var)
        };
        let value = self.values.get(s).unwrap_or_default();
        match value.parse::<u32>() {
            Ok(n) if n > 0 => n,
            _ => {
                self.fail(
                    s,
                    format!("{value:?} is not a whole number of {unit} above 0"),
                );
                1
            }
        }
    }

    fn switch(&mut self, s: &Setting) -> bool {
        debug_assert_eq!(s.kind, Kind::Switch, "{}", s.var);
        match self.values.get(s).unwrap_or_default() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            other => {
                self.fail(s, format!("{other:?} is not true or false"));
                false
            }
        }
    }

    /// One of the setting's words; `None` (with an error) for another value.
    fn choice(&mut self, s: &Setting) -> Option<&'static str> {
        let Kind::Choice(words) = s.kind else {
            unreachable!("{} is not a choice", s.var)
        };
        let value = self.values.get(s).unwrap_or_default();
        let word = words.iter().copied().find(|w| *w == value);
        if word.is_none() {
            self.fail(s, format!("{value:?} is not {}", words.join(", ")));
        }
        word
    }

    /// A URL with one of the setting's schemes. A secret URL's value is never repeated
    /// in the error.
    fn url(&mut self, s: &Setting) -> Option<String> {
        let Kind::Url(schemes) = s.kind else {
            unreachable!("{} is not a URL", s.var)
        };
        let value = self.values.get(s)?;
        let shown = match s.secret {
            Secret::No => format!("{value:?} "),
            _ => String::new(),
        };
        let Some(rest) = schemes.iter().find_map(|p| value.strip_prefix(p)) else {
            self.fail(
                s,
                format!("{shown}must start with {}", schemes.join(" or ")),
            );
            return None;
        };
        let host = rest.split(['/', '?']).next().unwrap_or_default();
        if s.secret == Secret::No && (host.is_empty() || host.contains(char::is_whitespace)) {
            self.fail(s, format!("{shown}has no valid host"));
            return None;
        }
        Some(value.to_string())
    }

    fn nodes(&mut self, s: &Setting) -> Option<Vec<Url>> {
        debug_assert_eq!(s.kind, Kind::Nodes, "{}", s.var);
        let value = self.values.get(s)?;
        parse_urls(value).map_err(|e| self.fail(s, e)).ok()
    }

    fn email(&mut self, s: &Setting) -> Option<String> {
        debug_assert_eq!(s.kind, Kind::Email, "{}", s.var);
        let value = self.values.get(s)?;
        if !looks_like_email(value) {
            self.fail(s, format!("{value:?} is not an email address"));
        }
        Some(value.to_string())
    }

    fn port(&mut self, s: &Setting) -> Option<u16> {
        debug_assert_eq!(s.kind, Kind::Port, "{}", s.var);
        let value = self.values.get(s)?;
        match value.parse::<u16>() {
            Ok(p) if p > 0 => Some(p),
            _ => {
                self.fail(s, format!("{value:?} is not a port number"));
                None
            }
        }
    }
}

/// The SMTP settings, if `SMTP_HOST` is set: a sender is then required, the port comes
/// from `SMTP_PORT`, `host:port` or the TLS mode.
fn smtp_settings(c: &mut Checker) -> Option<SmtpSettings> {
    let tls = match c.choice(&table::SMTP_TLS) {
        Some("none") => SmtpTls::None,
        Some("tls") => SmtpTls::Tls,
        _ => SmtpTls::Starttls,
    };
    let port = c.port(&table::SMTP_PORT);
    let given_sender = c.email(&table::SMTP_SENDER);
    let (user, password) = (c.text(&table::SMTP_USER), c.text(&table::SMTP_PASSWORD));
    let host = c.text(&table::SMTP_HOST)?;
    let (host, port_in_host) = match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
        _ => (host.clone(), None),
    };
    let port = match (port, port_in_host) {
        (Some(port), _) => port,
        (None, Some(p)) => p.parse::<u16>().ok().filter(|p| *p > 0).unwrap_or_else(|| {
            c.fail(&table::SMTP_HOST, format!("{p:?} is not a port number"));
            0
        }),
        (None, None) => match tls {
            SmtpTls::None => 25,
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
        },
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        c.fail(&table::SMTP_HOST, format!("{host:?} is not a host name"));
    }
    if given_sender.is_none() {
        c.fail(
            &table::SMTP_SENDER,
            "an email address is required with SMTP_HOST",
        );
    }
    if user.is_some() != password.is_some() {
        c.errors
            .push("SMTP_USER and SMTP_PASSWORD: give both, or neither".into());
    }
    Some(SmtpSettings {
        host,
        port,
        user,
        password,
        sender: given_sender.unwrap_or_default(),
        tls,
    })
}

fn without_trailing_slash(url: String) -> String {
    url.trim_end_matches('/').to_string()
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
fn backup_schedule(c: &mut Checker) -> Option<BackupSchedule> {
    let hours = c.count(&table::BACKUP_HOURS);
    let keep = c.count(&table::BACKUP_KEEP);
    let dir = c.path(&table::BACKUP_DIR)?;
    if dir.is_relative() {
        c.fail(
            &table::BACKUP_DIR,
            format!("{} must be an absolute path", dir.display()),
        );
        return None;
    }
    Some(BackupSchedule {
        dir,
        every: std::time::Duration::from_secs(u64::from(hours) * 3600),
        keep: usize::try_from(keep).unwrap_or(usize::MAX),
    })
}

/// The HTTPS mode; `acme` needs an https `KM_SITE_URL` (its host gets the certificate).
fn tls_mode(c: &mut Checker, site_url: Option<&str>) -> TlsMode {
    let acme_email = c.email(&table::ACME_EMAIL);
    let acme_directory = c.url(&table::ACME_DIRECTORY);
    let (cert, key) = (c.path(&table::TLS_CERT), c.path(&table::TLS_KEY));
    let ca = c.path(&table::ACME_CA);
    match c.choice(&table::TLS) {
        Some("files") => match (cert, key) {
            (Some(cert), Some(key)) => TlsMode::Files { cert, key },
            _ => {
                c.errors.push(
                    "KM_TLS=files: KM_TLS_CERT and KM_TLS_KEY (PEM files) are required".into(),
                );
                TlsMode::Off
            }
        },
        Some("acme") => {
            if !site_url.is_some_and(|u| u.starts_with("https://")) {
                c.errors.push("KM_TLS=acme: KM_SITE_URL must be the https:// URL whose host gets the certificate".into());
            }
            TlsMode::Acme {
                directory: acme_directory.unwrap_or_default(),
                email: acme_email,
                ca,
            }
        }
        _ => TlsMode::Off,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(entries: &[(&'static Setting, &str)]) -> Values {
        let mut values = Values::with_data_dir("./d");
        for (setting, value) in entries {
            values.set(setting, *value);
        }
        values
    }

    fn errors(entries: &[(&'static Setting, &str)]) -> String {
        Settings::from_values(&values(entries))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn reports_every_bad_variable_by_name() {
        let err = errors(&[
            (&table::LISTEN, "nope"),
            (&table::SITE_URL, "km.example.com"),
            (&table::RETENTION_DAYS, "-1"),
            (&table::MONGO_URL, "http://user:hunter2@db"),
            (&table::ELASTICSEARCH_URL, "http://[es"),
            (&table::REDIS_URL, "http://:pw@cache"),
            (&table::ELASTICSEARCH_PREFIX, "KM"),
            (&table::SMTP_TLS, "ssl3"),
        ]);
        for var in [
            "KM_LISTEN (--listen): \"nope\" is not an address like 127.0.0.1:8080",
            "KM_SITE_URL",
            "KM_RETENTION_DAYS (--retention-days): \"-1\" is not a whole number of days above 0",
            "KM_MONGO_URL (--mongo-url): must start with mongodb:// or mongodb+srv://",
            "KM_REDIS_URL",
            "KM_ELASTICSEARCH_URL",
            "KM_ELASTICSEARCH_PREFIX",
            "SMTP_TLS (--smtp-tls): \"ssl3\" is not none, starttls, tls",
        ] {
            assert!(err.contains(var), "{var} missing from: {err}");
        }
        assert!(!err.contains("hunter2"), "a password was repeated: {err}");
    }

    #[test]
    fn the_defaults_are_valid() {
        let s = Settings::from_values(&Values::with_data_dir("./d")).unwrap();
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.retention_days, 30);
        assert_eq!(s.logs_retention_days, 30);
        assert_eq!(s.tls, TlsMode::Off);
        assert_eq!(s.roles.interactor, "127.0.0.1:3900".parse().unwrap());
        assert!(s.smtp.is_none() && s.backups.is_none() && s.mongo_url.is_none());
    }

    #[test]
    fn flags_parse_into_the_settings() {
        let cmd = Values::augment_args(clap::Command::new("km"));
        let matches = cmd
            .try_get_matches_from(["km", "--data-dir", "./d", "--retention-days", "9"])
            .unwrap();
        let given = Values::from_arg_matches(&matches).unwrap();
        let s = Settings::from_values(&given).unwrap();
        assert_eq!(s.retention_days, 9);
        assert_eq!(s.logs_retention_days, 9);
        assert_eq!(s.data_dir, PathBuf::from("./d"));
    }

    #[test]
    fn elasticsearch_url_alias_and_seed_format() {
        let s = Settings::from_values(&values(&[(
            &table::ELASTICSEARCH_HOST,
            "es1:9200 es2:9200",
        )]))
        .unwrap();
        assert_eq!(s.elasticsearch.len(), 2);
        let s = Settings::from_values(&values(&[
            (&table::ELASTICSEARCH_URL, "https://es:9243"),
            (&table::ELASTICSEARCH_HOST, "ignored:1"),
        ]))
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
    fn env_map_reads_every_setting() {
        let all: BTreeMap<String, String> = table::ALL
            .iter()
            .map(|s| (s.var.to_string(), format!("-{}", s.var)))
            .collect();
        let values = Values::from_env_map(&all).unwrap();
        for s in table::ALL {
            assert_eq!(values.get(s), Some(format!("-{}", s.var).as_str()));
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
    fn smtp_needs_a_sender_and_both_credentials() {
        let err = errors(&[
            (&table::SMTP_HOST, "smtp.example.com"),
            (&table::SMTP_USER, "km"),
        ]);
        assert!(
            err.contains("SMTP_SENDER (--smtp-sender): an email address is required"),
            "{err}"
        );
        assert!(
            err.contains("SMTP_USER and SMTP_PASSWORD: give both"),
            "{err}"
        );
        let s = Settings::from_values(&values(&[
            (&table::SMTP_HOST, "smtp.example.com"),
            (&table::SMTP_SENDER, "km@example.com"),
            (&table::SMTP_TLS, "tls"),
        ]))
        .unwrap();
        let smtp = s.smtp.unwrap();
        assert_eq!((smtp.port, smtp.tls), (465, SmtpTls::Tls));
    }

    #[test]
    fn tls_modes_need_their_settings() {
        assert!(errors(&[(&table::TLS, "files")]).contains("KM_TLS_CERT and KM_TLS_KEY"));
        assert!(errors(&[(&table::TLS, "acme")]).contains("KM_SITE_URL must be the https://"));
        let s = Settings::from_values(&values(&[
            (&table::TLS, "acme"),
            (&table::SITE_URL, "https://km.example.com"),
        ]))
        .unwrap();
        assert!(
            matches!(s.tls, TlsMode::Acme { ref directory, .. } if directory == table::ACME_DIRECTORY.default.unwrap())
        );
        assert!(errors(&[(&table::BACKUP_DIR, "backups")]).contains("must be an absolute path"));
    }

    #[test]
    fn env_map_reports_typos_with_the_other_errors() {
        let vars = map(&[
            ("KM_SITEURL", "https://km.example.com"),
            ("SMTP_HOTS", "smtp"),
            ("KM_WHATEVER_THIS_IS", "1"),
            ("KM_LISTEN", "nope"),
        ]);
        let err = Values::from_env_map(&vars).unwrap_err().0;
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
        let s = Settings::from_values(&values(&[])).unwrap();
        assert!(s.licence(0).is_none());
        let s =
            Settings::from_values(&values(&[(&table::DEDICATED_KEY, "not-a-licence")])).unwrap();
        assert_eq!(s.licence(0), Some(Err(LicenceError::NotKm)));
    }

    #[test]
    fn a_mistyped_name_finds_the_nearest_setting() {
        let known = ["KM_SITE_URL", "SMTP_HOST"];
        assert_eq!(closest("KM_SITEURL", &known), Some("KM_SITE_URL"));
        assert_eq!(closest("SMTP_HOTS", &known), Some("SMTP_HOST"));
        assert_eq!(closest("KM_NOTHING_LIKE_IT", &known), None);
    }

    #[test]
    fn public_url_from_site_url_or_listen() {
        let s = Settings::from_values(&values(&[])).unwrap();
        assert_eq!(
            s.public_url("0.0.0.0:9000".parse().unwrap()),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            s.public_url("10.1.2.3:80".parse().unwrap()),
            "http://10.1.2.3:80"
        );
        let s = Settings::from_values(&values(&[(&table::SITE_URL, "https://km.example.com/")]))
            .unwrap();
        assert_eq!(
            s.public_url("0.0.0.0:80".parse().unwrap()),
            "https://km.example.com"
        );
    }
}
