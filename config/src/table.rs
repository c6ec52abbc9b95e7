//! Every setting of the appliance, declared once: its variable, flag, kind of value,
//! default, whether its value is secret, the report group it belongs to and its help.
//! `km serve`'s flags, the env file reader, `km config check`, the wizard, the support
//! bundle's masking and the README's table (`km config settings`) all read this table.

/// What a setting's value is; checked the same way wherever it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ip:port`.
    Address,
    /// A file or directory.
    Path,
    /// A URL starting with one of these schemes.
    Url(&'static [&'static str]),
    /// Elasticsearch nodes: `host:port` or URLs, separated by spaces.
    Nodes,
    /// A whole number above 0, of this unit.
    Count(&'static str),
    /// `true` or `false`.
    Switch,
    /// One of these words.
    Choice(&'static [&'static str]),
    /// An email address.
    Email,
    /// A TCP port.
    Port,
    /// Free text.
    Text,
}

impl Kind {
    /// The value's name in `km serve --help`.
    pub fn placeholder(self) -> &'static str {
        match self {
            Kind::Address => "ADDR",
            Kind::Path => "PATH",
            Kind::Url(_) => "URL",
            Kind::Nodes => "URLS",
            Kind::Count(_) => "N",
            Kind::Switch => "BOOL",
            Kind::Choice(_) => "WORD",
            Kind::Email => "EMAIL",
            Kind::Port => "PORT",
            Kind::Text => "TEXT",
        }
    }

    /// How the README names the kind.
    pub fn describe(self) -> String {
        match self {
            Kind::Address => "address".into(),
            Kind::Path => "path".into(),
            Kind::Url(schemes) => format!("URL ({})", schemes.join(", ")),
            Kind::Nodes => "URLs".into(),
            Kind::Count(unit) => format!("number of {unit}"),
            Kind::Switch => "`true`/`false`".into(),
            Kind::Choice(words) => words
                .iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(" / "),
            Kind::Email => "email".into(),
            Kind::Port => "port".into(),
            Kind::Text => "text".into(),
        }
    }
}

/// How much of a value must never be shown (logs, support bundles, the wizard's form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secret {
    No,
    /// The whole value.
    Whole,
    /// The password a URL may carry (`scheme://user:password@host`).
    InUrl,
}

/// The user info of a URL (`scheme://user:password@host...`), if it has one.
pub fn url_userinfo(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    // The last '@' ends the user info: a raw '@' in a password is a common mistake.
    authority.rfind('@').map(|at| &authority[..at])
}

/// The password in a URL, if it has one (as written, maybe percent-encoded).
pub fn url_password(url: &str) -> Option<&str> {
    url_userinfo(url)?
        .split_once(':')
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty())
}

/// The line of `km config check`'s report (and the wizard's section) a setting is judged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    Listen,
    Roles,
    SiteUrl,
    Tls,
    DataDir,
    Documents,
    Events,
    Bus,
    Retention,
    Backups,
    SignUp,
    Smtp,
    Licence,
}

impl Group {
    /// Every group, in the order of the report.
    pub const ALL: [Group; 13] = [
        Group::Listen,
        Group::Roles,
        Group::SiteUrl,
        Group::Tls,
        Group::DataDir,
        Group::Documents,
        Group::Events,
        Group::Bus,
        Group::Retention,
        Group::Backups,
        Group::SignUp,
        Group::Smtp,
        Group::Licence,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Group::Listen => "listen",
            Group::Roles => "roles",
            Group::SiteUrl => "site URL",
            Group::Tls => "TLS",
            Group::DataDir => "data dir",
            Group::Documents => "documents",
            Group::Events => "events",
            Group::Bus => "bus",
            Group::Retention => "retention",
            Group::Backups => "backups",
            Group::SignUp => "sign-up",
            Group::Smtp => "SMTP",
            Group::Licence => "licence",
        }
    }

    /// The settings of this group, in table order.
    pub fn settings(self) -> impl Iterator<Item = &'static Setting> {
        ALL.iter().copied().filter(move |s| s.group == self)
    }
}

/// One setting.
#[derive(Debug, PartialEq, Eq)]
pub struct Setting {
    /// The environment variable (and env file name).
    pub var: &'static str,
    /// The flag of `km serve`, without `--`.
    pub flag: &'static str,
    pub kind: Kind,
    pub default: Option<&'static str>,
    /// What leaving it unset means, when it has no default.
    pub unset: &'static str,
    pub secret: Secret,
    pub group: Group,
    pub help: &'static str,
    /// An older name kept working, left out of help and docs.
    pub hidden: bool,
}

impl Setting {
    /// `KM_LISTEN (--listen)`: how errors name a setting.
    pub fn named(&self) -> String {
        format!("{} (--{})", self.var, self.flag)
    }

    /// The value km reads when `given` is what was set: trimmed, else the default (an
    /// empty value is unset).
    pub fn read<'a>(&self, given: Option<&'a str>) -> Option<&'a str> {
        given
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .or(self.default)
    }
}

/// A setting with its names, kind and group; each one below fills in the rest.
const fn setting(var: &'static str, flag: &'static str, kind: Kind, group: Group) -> Setting {
    Setting {
        var,
        flag,
        kind,
        default: None,
        unset: "unset",
        secret: Secret::No,
        group,
        help: "",
        hidden: false,
    }
}

pub const LISTEN: Setting = Setting {
    default: Some("127.0.0.1:8080"),
    help: "the one port for agents, API, realtime and dashboard (with KM_TLS, the plain port that redirects to HTTPS)",
    ..setting("KM_LISTEN", "listen", Kind::Address, Group::Listen)
};
pub const HTTPS_LISTEN: Setting = Setting {
    default: Some("0.0.0.0:443"),
    help: "the HTTPS port when KM_TLS is not `off`",
    ..setting(
        "KM_HTTPS_LISTEN",
        "https-listen",
        Kind::Address,
        Group::Listen,
    )
};
pub const WIZARD_URL: Setting = Setting {
    unset: "unset: no `/wizard/`",
    help: "the setup wizard's local address (`http://127.0.0.1:8090`): `/wizard/` on km's ports is passed to it",
    ..setting(
        "KM_WIZARD_URL",
        "wizard-url",
        Kind::Url(&["http://"]),
        Group::Listen,
    )
};
pub const API_LISTEN: Setting = Setting {
    default: Some("127.0.0.1:3010"),
    help: "the api role's address (`km serve --role api`): API, dashboard, verifyPM2",
    ..setting("KM_API_LISTEN", "api-listen", Kind::Address, Group::Roles)
};
pub const AUTH_LISTEN: Setting = Setting {
    default: Some("127.0.0.1:3100"),
    help: "the auth role's address: `/api/oauth`",
    ..setting("KM_AUTH_LISTEN", "auth-listen", Kind::Address, Group::Roles)
};
pub const REALTIME_LISTEN: Setting = Setting {
    default: Some("127.0.0.1:4010"),
    help: "the realtime role's address: `/primus`",
    ..setting(
        "KM_REALTIME_LISTEN",
        "realtime-listen",
        Kind::Address,
        Group::Roles,
    )
};
pub const INTERACTOR_LISTEN: Setting = Setting {
    default: Some("127.0.0.1:3900"),
    help: "the interactor role's address: `/interaction` (agents)",
    ..setting(
        "KM_INTERACTOR_LISTEN",
        "interactor-listen",
        Kind::Address,
        Group::Roles,
    )
};
pub const WORKERS_LISTEN: Setting = Setting {
    default: Some("127.0.0.1:3300"),
    help: "the workers role's address: its `/healthz` and `/metrics` only (the gateway gathers them)",
    ..setting(
        "KM_WORKERS_LISTEN",
        "workers-listen",
        Kind::Address,
        Group::Roles,
    )
};
pub const SITE_URL: Setting = Setting {
    unset: "`http://<listen address>`",
    help: "public URL given to agents and clients (`endpoints`); agents connect to `<KM_SITE_URL>/interaction`",
    ..setting(
        "KM_SITE_URL",
        "site-url",
        Kind::Url(&["http://", "https://"]),
        Group::SiteUrl,
    )
};
pub const TLS: Setting = Setting {
    default: Some("off"),
    help: "HTTPS: `off` (plain HTTP), `acme` (a certificate for KM_SITE_URL's host from an ACME CA) or `files` (KM_TLS_CERT and KM_TLS_KEY)",
    ..setting(
        "KM_TLS",
        "tls",
        Kind::Choice(&["off", "acme", "files"]),
        Group::Tls,
    )
};
pub const TLS_CERT: Setting = Setting {
    help: "PEM certificate chain (KM_TLS=files)",
    ..setting("KM_TLS_CERT", "tls-cert", Kind::Path, Group::Tls)
};
pub const TLS_KEY: Setting = Setting {
    help: "PEM private key (KM_TLS=files)",
    ..setting("KM_TLS_KEY", "tls-key", Kind::Path, Group::Tls)
};
pub const ACME_DIRECTORY: Setting = Setting {
    default: Some("https://acme-v02.api.letsencrypt.org/directory"),
    help: "the ACME directory (KM_TLS=acme)",
    ..setting(
        "KM_ACME_DIRECTORY",
        "acme-directory",
        Kind::Url(&["https://"]),
        Group::Tls,
    )
};
pub const ACME_EMAIL: Setting = Setting {
    help: "contact address given to the ACME CA",
    ..setting("KM_ACME_EMAIL", "acme-email", Kind::Email, Group::Tls)
};
pub const ACME_CA: Setting = Setting {
    unset: "unset: the system's CAs",
    help: "PEM file of the CA that signs the ACME directory's HTTPS certificate (a private CA)",
    ..setting("KM_ACME_CA", "acme-ca", Kind::Path, Group::Tls)
};
pub const DATA_DIR: Setting = Setting {
    default: Some("./km-data"),
    help: "embedded stores (`documents.sqlite`, `events.sqlite`), ACME account and certificate",
    ..setting("KM_DATA_DIR", "data-dir", Kind::Path, Group::DataDir)
};
pub const MONGO_URL: Setting = Setting {
    unset: "unset: embedded",
    secret: Secret::InUrl,
    help: "MongoDB connection string for users, tokens, buckets and servers (`mongodb://user:pw@host:27017/km`); km stops at start, naming it, if it cannot connect",
    ..setting(
        "KM_MONGO_URL",
        "mongo-url",
        Kind::Url(&["mongodb://", "mongodb+srv://"]),
        Group::Documents,
    )
};
pub const ELASTICSEARCH_URL: Setting = Setting {
    unset: "unset: embedded",
    secret: Secret::InUrl,
    help: "Elasticsearch 7+ / OpenSearch nodes for events and metric history, separated by spaces (`es1:9200 es2:9200` or full URLs); daily indices `<prefix>-<kind>-YYYY.MM.DD`, retention drops whole days",
    ..setting(
        "KM_ELASTICSEARCH_URL",
        "elasticsearch-url",
        Kind::Nodes,
        Group::Events,
    )
};
pub const ELASTICSEARCH_HOST: Setting = Setting {
    secret: Secret::InUrl,
    help: "older name of KM_ELASTICSEARCH_URL",
    hidden: true,
    ..setting(
        "KM_ELASTICSEARCH_HOST",
        "elasticsearch-host",
        Kind::Nodes,
        Group::Events,
    )
};
pub const ELASTICSEARCH_PREFIX: Setting = Setting {
    default: Some("km"),
    help: "index name prefix: lowercase letters, digits or `_`",
    ..setting(
        "KM_ELASTICSEARCH_PREFIX",
        "elasticsearch-prefix",
        Kind::Text,
        Group::Events,
    )
};
pub const REDIS_URL: Setting = Setting {
    unset: "unset: in process",
    secret: Secret::InUrl,
    help: "Redis for running several km nodes as one (`redis://:pw@host:6379/`, `rediss://` for TLS, `redis+unix://` for a local socket)",
    ..setting(
        "KM_REDIS_URL",
        "redis-url",
        Kind::Url(&["redis://", "rediss://", "redis+unix://"]),
        Group::Bus,
    )
};
pub const RETENTION_DAYS: Setting = Setting {
    default: Some("30"),
    help: "days of events and metric history kept",
    ..setting(
        "KM_RETENTION_DAYS",
        "retention-days",
        Kind::Count("days"),
        Group::Retention,
    )
};
pub const LOGS_RETENTION_DAYS: Setting = Setting {
    unset: "as KM_RETENTION_DAYS",
    help: "days of logs kept",
    ..setting(
        "KM_LOGS_RETENTION_DAYS",
        "logs-retention-days",
        Kind::Count("days"),
        Group::Retention,
    )
};
pub const BACKUP_DIR: Setting = Setting {
    unset: "unset: no scheduled backups (the appliance: `/var/backups/km`)",
    help: "absolute directory the workers write a backup to every KM_BACKUP_HOURS",
    ..setting("KM_BACKUP_DIR", "backup-dir", Kind::Path, Group::Backups)
};
pub const BACKUP_HOURS: Setting = Setting {
    default: Some("24"),
    help: "hours between scheduled backups",
    ..setting(
        "KM_BACKUP_HOURS",
        "backup-hours",
        Kind::Count("hours"),
        Group::Backups,
    )
};
pub const BACKUP_KEEP: Setting = Setting {
    default: Some("7"),
    help: "scheduled backups kept (the oldest go)",
    ..setting(
        "KM_BACKUP_KEEP",
        "backup-keep",
        Kind::Count("backups"),
        Group::Backups,
    )
};
pub const ALLOW_SIGNUP: Setting = Setting {
    default: Some("false"),
    help: "whether anyone may sign up once the first account exists (when `false`, admins create accounts)",
    ..setting(
        "KM_ALLOW_SIGNUP",
        "allow-signup",
        Kind::Switch,
        Group::SignUp,
    )
};
pub const SMTP_HOST: Setting = Setting {
    unset: "unset: no mail",
    help: "SMTP server for notifications, `host` or `host:port`",
    ..setting("SMTP_HOST", "smtp-host", Kind::Text, Group::Smtp)
};
pub const SMTP_PORT: Setting = Setting {
    unset: "465 with `tls`, 587 with `starttls`, 25 with `none`",
    help: "SMTP port",
    ..setting("SMTP_PORT", "smtp-port", Kind::Port, Group::Smtp)
};
pub const SMTP_USER: Setting = Setting {
    help: "SMTP login (with SMTP_PASSWORD, or neither)",
    ..setting("SMTP_USER", "smtp-user", Kind::Text, Group::Smtp)
};
pub const SMTP_PASSWORD: Setting = Setting {
    secret: Secret::Whole,
    help: "SMTP password",
    ..setting("SMTP_PASSWORD", "smtp-password", Kind::Text, Group::Smtp)
};
pub const SMTP_SENDER: Setting = Setting {
    unset: "required with SMTP_HOST",
    help: "the From address of notifications",
    ..setting("SMTP_SENDER", "smtp-sender", Kind::Email, Group::Smtp)
};
pub const SMTP_TLS: Setting = Setting {
    default: Some("starttls"),
    help: "`starttls` (required, not opportunistic), `tls` (SMTPS) or `none` (a local relay)",
    ..setting(
        "SMTP_TLS",
        "smtp-tls",
        Kind::Choice(&["none", "starttls", "tls"]),
        Group::Smtp,
    )
};
pub const DEDICATED_KEY: Setting = Setting {
    secret: Secret::Whole,
    help: "the licence (`km1.…`, signed by the vendor; `km licence show` prints what it grants)",
    ..setting(
        "KM_DEDICATED_KEY",
        "dedicated-key",
        Kind::Text,
        Group::Licence,
    )
};

/// Every setting, in the order of the report and the docs.
pub const ALL: &[&Setting] = &[
    &LISTEN,
    &HTTPS_LISTEN,
    &WIZARD_URL,
    &API_LISTEN,
    &AUTH_LISTEN,
    &REALTIME_LISTEN,
    &INTERACTOR_LISTEN,
    &WORKERS_LISTEN,
    &SITE_URL,
    &TLS,
    &TLS_CERT,
    &TLS_KEY,
    &ACME_DIRECTORY,
    &ACME_EMAIL,
    &ACME_CA,
    &DATA_DIR,
    &MONGO_URL,
    &ELASTICSEARCH_URL,
    &ELASTICSEARCH_HOST,
    &ELASTICSEARCH_PREFIX,
    &REDIS_URL,
    &RETENTION_DAYS,
    &LOGS_RETENTION_DAYS,
    &BACKUP_DIR,
    &BACKUP_HOURS,
    &BACKUP_KEEP,
    &ALLOW_SIGNUP,
    &SMTP_HOST,
    &SMTP_PORT,
    &SMTP_USER,
    &SMTP_PASSWORD,
    &SMTP_SENDER,
    &SMTP_TLS,
    &DEDICATED_KEY,
];

/// The log filter: read by the logger from the environment, not a setting of `km serve`,
/// but an env file may set it.
pub const LOG: &str = "KM_LOG";

/// The prefixes of the appliance's own variables: an unknown one is a typo.
pub const OWN_PREFIXES: &[&str] = &["KM_", "SMTP_"];

/// The setting named `var`.
pub fn by_var(var: &str) -> Option<&'static Setting> {
    ALL.iter().copied().find(|s| s.var == var)
}

/// The README's table of settings, one row each (`km config settings` prints it).
pub fn markdown() -> String {
    let mut out = String::from(
        "| variable | flag | value | default | meaning |\n| --- | --- | --- | --- | --- |\n",
    );
    for s in ALL.iter().filter(|s| !s.hidden) {
        let default = s
            .default
            .map_or_else(|| s.unset.to_string(), |d| format!("`{d}`"));
        out.push_str(&format!(
            "| `{}` | `--{}` | {} | {} | {} |\n",
            s.var,
            s.flag,
            s.kind.describe(),
            default,
            s.help
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_well_formed() {
        for (i, s) in ALL.iter().enumerate() {
            assert!(
                OWN_PREFIXES.iter().any(|p| s.var.starts_with(p)),
                "{}",
                s.var
            );
            assert!(!s.help.is_empty(), "{} has no help", s.var);
            for other in &ALL[i + 1..] {
                assert_ne!(s.var, other.var);
                assert_ne!(s.flag, other.flag);
            }
            if let (Some(default), Kind::Choice(words)) = (s.default, s.kind) {
                assert!(words.contains(&default), "{}", s.var);
            }
        }
    }

    #[test]
    fn the_readme_shows_this_table() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        assert!(
            readme.contains(&markdown()),
            "README.md's table of settings differs from `km config settings`:\n{}",
            markdown()
        );
    }

    #[test]
    fn every_group_has_settings() {
        for group in Group::ALL {
            assert!(group.settings().next().is_some(), "{}", group.name());
        }
    }
}
