//! A configuration judged as a whole, the same way for `km config check` and the setup
//! wizard: the static checks of `km serve` (values, licence), then the live checks of
//! each configured part (connect, authenticate, write and delete, send a test mail, ...).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::check_settings;
use super::checks::{self, Check};
use km_config::{Group, Settings, TlsMode, table};
use km_tls::{self, challenge::Challenges};

/// The parts of the wizard's form, with the report groups each covers.
pub const SECTIONS: &[(&str, &[&str])] = &[
    ("licence", &["licence"]),
    (
        "stores",
        &[
            "documents",
            "events",
            "bus",
            "data dir",
            "retention",
            "backups",
        ],
    ),
    ("site", &["site URL", "listen"]),
    ("smtp", &["SMTP"]),
    ("tls", &["TLS"]),
    ("access", &["sign-up"]),
];

#[derive(Default)]
pub struct Options {
    /// Where the SMTP check sends a real test mail.
    pub test_mail_to: Option<String>,
    /// Only this section of [`SECTIONS`] (the wizard checks one part at a time).
    pub only: Option<String>,
    /// A path under the site URL that answers `nonce` when the URL reaches this machine.
    pub probe: Option<(String, String)>,
    /// Answers ACME HTTP-01 challenges on port 80 for a dry run; without it the ACME
    /// settings are checked statically only.
    pub challenges: Option<Challenges>,
    /// CAs trusted for SMTP besides the system's (PEM), for private mail servers.
    pub smtp_extra_ca: Option<PathBuf>,
}

impl Options {
    fn wants(&self, section: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == section)
    }
}

fn now_s() -> i64 {
    km_stores::ids::now_ms() / 1000
}

/// Every check of `env` (the variables of an env file), static ones first.
pub async fn all(env: &BTreeMap<String, String>, options: &Options) -> Vec<Check> {
    let judged = check_settings(env, now_s());
    let mut found = Vec::new();
    let mut broken_sections = Vec::new();
    for (section, groups) in SECTIONS.iter().filter(|(s, _)| options.wants(s)) {
        for group in judged
            .report
            .groups
            .iter()
            .filter(|g| groups.contains(&g.group))
        {
            let setting = first_variable(group.group);
            for problem in &group.problems {
                broken_sections.push(*section);
                let setting = variable_of(problem).unwrap_or(setting);
                found.push(Check::failed(setting, without_variable(problem, setting)));
            }
            if group.problems.is_empty()
                && let Some(note) = &group.note
            {
                found.push(if group.warn {
                    Check::warning(setting, note.clone())
                } else {
                    Check::ok(setting, note.clone())
                });
            }
        }
    }
    // Syntax or unknown variables concern the whole file.
    for group in judged
        .report
        .groups
        .iter()
        .filter(|g| g.group == super::FILE_GROUP)
    {
        for problem in &group.problems {
            found.push(Check::failed(
                variable_of(problem).unwrap_or("env file"),
                problem.clone(),
            ));
        }
    }
    match &judged.settings {
        Some(settings) => found.extend(live_sections(settings, options, &broken_sections).await),
        // A part that is fine itself cannot be tried while another is wrong: said, not
        // passed over as if there were nothing to check.
        None if found.is_empty() => {
            if let Some(problem) = judged.report.groups.iter().flat_map(|g| &g.problems).next() {
                found.push(Check::warning(
                    "live checks",
                    format!("not tried until the other parts are valid: {problem}"),
                ));
            }
        }
        None => {}
    }
    found
}

/// The live checks only, for a configuration whose static report is clean.
pub async fn live_only(settings: &Settings, options: &Options) -> Vec<Check> {
    live_sections(settings, options, &[]).await
}

/// The live checks of the wanted sections but `skip` (those whose values are wrong).
async fn live_sections(settings: &Settings, options: &Options, skip: &[&str]) -> Vec<Check> {
    let mut found = Vec::new();
    for (section, _) in SECTIONS
        .iter()
        .filter(|(s, _)| options.wants(s) && !skip.contains(s))
    {
        found.extend(live(section, settings, options).await);
    }
    found
}

/// The live checks of one section.
async fn live(section: &str, s: &Settings, options: &Options) -> Vec<Check> {
    let mut found = Vec::new();
    match section {
        "stores" => {
            if let Some(url) = &s.mongo_url {
                found.push(checks::check_mongo(url).await);
            }
            if !s.elasticsearch.is_empty() {
                found.push(checks::check_elasticsearch(&s.elasticsearch).await);
            }
            if let Some(url) = &s.redis_url {
                found.push(checks::check_redis(url).await);
            }
        }
        "site" => {
            if let Some(url) = &s.site_url {
                let probe = options
                    .probe
                    .as_ref()
                    .map(|(path, nonce)| (path.as_str(), nonce.as_str()));
                found.push(checks::check_site_url(url, probe).await);
            }
        }
        "smtp" => {
            if let Some(smtp) = &s.smtp {
                let extra_ca_pem = options
                    .smtp_extra_ca
                    .as_ref()
                    .and_then(|p| std::fs::read(p).ok());
                let smtp_options = checks::SmtpCheckOptions { extra_ca_pem };
                found.push(
                    checks::check_smtp_with(smtp, options.test_mail_to.as_deref(), &smtp_options)
                        .await,
                );
            }
        }
        "tls" => found.extend(tls(s, options).await),
        _ => {}
    }
    found
}

async fn tls(s: &Settings, options: &Options) -> Option<Check> {
    let host = km_tls::site_host(s.site_url.as_deref()).unwrap_or_default();
    match &s.tls {
        TlsMode::Off => Some(Check::warning(
            table::TLS.var,
            "plain HTTP: passwords and tokens cross the network in clear; use it only behind a TLS proxy",
        )),
        TlsMode::Files { cert, key } => Some(match (std::fs::read(cert), std::fs::read(key)) {
            (Ok(cert), Ok(key)) => checks::check_tls_files(&cert, &key, &host),
            (Err(e), _) => Check::failed(
                table::TLS_CERT.var,
                format!("cannot read {}: {e}", cert.display()),
            ),
            (_, Err(e)) => Check::failed(
                table::TLS_KEY.var,
                format!("cannot read {}: {e}", key.display()),
            ),
        }),
        TlsMode::Acme {
            directory,
            email,
            ca,
        } => Some(match &options.challenges {
            None => Check::warning(
                table::TLS.var,
                "ACME settings are well-formed; a trial order is only made from the wizard (it must answer on port 80)",
            ),
            Some(challenges) => match km_tls::acme::acme_dry_run(
                directory,
                ca.as_deref(),
                email.as_deref(),
                &host,
                challenges,
            )
            .await
            {
                Ok(()) => Check::ok(
                    table::ACME_DIRECTORY.var,
                    format!("the CA validated a trial order for {host} over HTTP-01"),
                ),
                Err(why) => Check::failed(table::ACME_DIRECTORY.var, why),
            },
        }),
    }
}

/// The variable a problem starts with (every problem names its variable first).
fn variable_of(problem: &str) -> Option<&'static str> {
    let var = problem
        .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .next()?;
    table::by_var(var).map(|s| s.var)
}

/// `problem` without its leading `VAR: ` or `VAR (--flag): `: the check names the
/// variable already (else pages show `SMTP_SENDER: SMTP_SENDER: ...`).
fn without_variable(problem: &str, var: &str) -> String {
    let Some(rest) = problem.strip_prefix(var) else {
        return problem.to_string();
    };
    let rest = match rest.strip_prefix(" (--") {
        Some(flagged) => flagged.split_once(')').map_or(rest, |(_, after)| after),
        None => rest,
    };
    rest.strip_prefix(": ")
        .map_or_else(|| problem.to_string(), str::to_string)
}

fn first_variable(group: &str) -> &'static str {
    Group::ALL
        .into_iter()
        .find(|g| g.name() == group)
        .and_then(|g| g.settings().next())
        .map_or("env file", |s| s.var)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_do_not_repeat_their_variable() {
        let cut = |p: &str, v: &str| without_variable(p, v);
        assert_eq!(
            cut("SMTP_SENDER: \"x\" is not an email address", "SMTP_SENDER"),
            "\"x\" is not an email address"
        );
        assert_eq!(
            cut(
                "KM_LISTEN (--listen): \"no\" is not an address",
                "KM_LISTEN"
            ),
            "\"no\" is not an address"
        );
        for whole in [
            "KM_TLS=acme: KM_SITE_URL must be https",
            "SMTP_USER and SMTP_PASSWORD: give both, or neither",
        ] {
            assert_eq!(cut(whole, variable_of(whole).unwrap_or("x")), whole);
        }
    }

    #[tokio::test]
    async fn a_part_that_cannot_be_tried_says_why() {
        let env: BTreeMap<String, String> = [
            ("KM_SITE_URL", "not a url"),
            ("SMTP_HOST", "127.0.0.1:1"),
            ("SMTP_SENDER", "km@example.com"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let options = Options {
            only: Some("smtp".into()),
            ..Options::default()
        };
        let found = all(&env, &options).await;
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].status, checks::Status::Warning);
        assert!(
            found[0].detail.contains("not tried until") && found[0].detail.contains("KM_SITE_URL"),
            "{found:?}"
        );
    }
}
