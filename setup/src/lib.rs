//! Judging a configuration, shared by `km config check` and the wizard so both judge
//! settings with the same code: the report per group of settings (here), the live checks
//! of what the settings point at (`checks`), and both per wizard section (`validate`).

pub mod checks;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;

use km_config::envfile;
use km_config::licence;
use km_config::{Group, Settings, SmtpSettings, TlsMode, table};

/// The group of problems not about one setting (syntax, unknown variables).
pub const FILE_GROUP: &str = "env file";

/// One group's verdict: fine (with what was understood) or its problems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupReport {
    pub group: &'static str,
    pub problems: Vec<String>,
    /// What the settings mean, for a group without problems (e.g. "embedded").
    pub note: Option<String>,
    /// The note deserves a look though nothing is wrong (no licence): a warning in the
    /// wizard and headless apply.
    pub warn: bool,
}

/// A verdict per group, in the order of [`Group::ALL`] after [`FILE_GROUP`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub groups: Vec<GroupReport>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.groups.iter().all(|g| g.problems.is_empty())
    }
}

/// One line per group: `ok`, `ok: note` or `error: problem; problem`.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for g in &self.groups {
            match (&g.problems[..], &g.note) {
                ([], None) => writeln!(f, "{:<10} ok", g.group)?,
                ([], Some(note)) => writeln!(f, "{:<10} ok: {note}", g.group)?,
                (problems, _) => writeln!(f, "{:<10} error: {}", g.group, problems.join("; "))?,
            }
        }
        Ok(())
    }
}

/// The report on a configuration, and its settings when valid (for the live checks).
#[derive(Debug)]
pub struct StaticCheck {
    pub report: Report,
    pub settings: Option<Settings>,
}

/// Checks an env file's text without contacting anything: syntax, variable names,
/// values, licence (at `now_s`, epoch seconds).
pub fn check_env_file(text: &str, now_s: i64) -> StaticCheck {
    match envfile::parse(text) {
        Ok(entries) => check_settings(&entries.into_iter().collect(), now_s),
        Err(e) => StaticCheck {
            report: Report {
                groups: vec![GroupReport {
                    group: FILE_GROUP,
                    problems: vec![e.to_string()],
                    note: None,
                    warn: false,
                }],
            },
            settings: None,
        },
    }
}

/// Checks variables as `km serve` would read them, and the licence if one is set.
pub fn check_settings(map: &BTreeMap<String, String>, now_s: i64) -> StaticCheck {
    let (settings, mut errors) = match Settings::from_env_map(map) {
        Ok(s) => (Some(s), Vec::new()),
        Err(e) => (None, e.0),
    };
    let licence = map
        .get(table::DEDICATED_KEY.var)
        .map(|text| text.trim())
        .filter(|text| !text.is_empty())
        .map(|text| licence::verify(text, now_s));
    if let Some(Err(e)) = &licence {
        errors.push(format!("{}: {e}", table::DEDICATED_KEY.var));
    }
    let mut groups = vec![group_report(FILE_GROUP, &errors, None)];
    for group in Group::ALL {
        let note = match group {
            Group::Licence => Some(
                licence
                    .as_ref()
                    .and_then(|l| l.as_ref().ok())
                    .map_or_else(|| licence::UNLICENSED.to_string(), |l| l.to_string()),
            ),
            _ => settings.as_ref().and_then(|s| note(group, s)),
        };
        let mut report = group_report(group.name(), &errors, note);
        report.warn = group == Group::Licence && licence.is_none();
        groups.push(report);
    }
    StaticCheck {
        report: Report { groups },
        settings,
    }
}

fn group_report(group: &'static str, errors: &[String], note: Option<String>) -> GroupReport {
    let problems: Vec<String> = errors
        .iter()
        .filter(|e| group_of(e) == group)
        .cloned()
        .collect();
    let note = note.filter(|_| problems.is_empty());
    GroupReport {
        group,
        problems,
        note,
        warn: false,
    }
}

/// The group of an error, from the variable it starts with (as every error does).
fn group_of(error: &str) -> &'static str {
    let var = error
        .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .next()
        .unwrap_or_default();
    table::by_var(var).map_or(FILE_GROUP, |s| s.group.name())
}

/// What a valid group means, where it is worth saying.
fn note(group: Group, s: &Settings) -> Option<String> {
    let embedded = || "embedded, in KM_DATA_DIR".to_string();
    Some(match group {
        Group::SiteUrl => s
            .site_url
            .clone()
            .unwrap_or_else(|| "derived from KM_LISTEN".into()),
        Group::Tls => match &s.tls {
            TlsMode::Off => "off (plain HTTP)".into(),
            TlsMode::Files { .. } => "certificate files".into(),
            TlsMode::Acme { directory, .. } => format!("ACME ({directory})"),
        },
        Group::Documents if s.mongo_url.is_some() => "MongoDB".into(),
        Group::Documents => embedded(),
        Group::Events if !s.elasticsearch.is_empty() => "Elasticsearch".into(),
        Group::Events => embedded(),
        Group::Bus if s.redis_url.is_some() => "Redis".into(),
        Group::Bus => "in process (one node)".into(),
        Group::Backups => match &s.backups {
            Some(b) => format!(
                "every {} h into {}, the last {} kept",
                b.every.as_secs() / 3600,
                b.dir.display(),
                b.keep
            ),
            None => "off (KM_BACKUP_DIR not set)".into(),
        },
        Group::Smtp => match &s.smtp {
            Some(SmtpSettings { host, port, .. }) => format!("{host}:{port}"),
            None => "not set: no email".into(),
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_file_reports_ok_per_group() {
        let check = check_env_file("KM_SITE_URL=https://km.example.com\nKM_LOG=info\n", 0);
        assert!(check.report.is_ok(), "{}", check.report);
        assert!(check.settings.is_some());
        let text = check.report.to_string();
        assert_eq!(text.lines().count(), Group::ALL.len() + 1, "{text}");
        assert!(text.contains("env file   ok\n"), "{text}");
        assert!(
            text.contains("site URL   ok: https://km.example.com\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("licence    ok: {}\n", licence::UNLICENSED)),
            "{text}"
        );
    }

    #[test]
    fn problems_land_in_their_groups() {
        let check = check_env_file(
            "KM_SITE_URL=nope\nSMTP_HOST=smtp.example.com\nKM_MONGOURL=x\nKM_DEDICATED_KEY=abc\n",
            0,
        );
        assert!(!check.report.is_ok());
        assert!(check.settings.is_none());
        let problems = |group: &str| {
            check
                .report
                .groups
                .iter()
                .find(|g| g.group == group)
                .map(|g| g.problems.clone())
                .unwrap_or_default()
        };
        assert!(problems("site URL")[0].starts_with("KM_SITE_URL"));
        assert!(problems("SMTP")[0].starts_with("SMTP_SENDER"));
        assert_eq!(
            problems(FILE_GROUP),
            ["KM_MONGOURL: not a setting of km (did you mean KM_MONGO_URL?)"]
        );
        assert_eq!(
            problems("licence"),
            ["KM_DEDICATED_KEY: not a KM licence (expected km1.…)"]
        );
        assert!(problems("listen").is_empty());
        let text = check.report.to_string();
        assert!(text.contains("listen     ok\n"), "{text}");
        assert!(text.contains("SMTP       error: SMTP_SENDER"), "{text}");
    }

    #[test]
    fn syntax_errors_stop_the_check() {
        let check = check_env_file("KM_SITE_URL=https://x\nnonsense\n", 0);
        assert!(!check.report.is_ok());
        assert_eq!(
            check.report.to_string(),
            "env file   error: line 2: expected KEY=VALUE\n"
        );
    }
}
