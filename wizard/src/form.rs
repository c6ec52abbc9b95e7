//! The wizard's form: prefilled from the current env file (secrets never sent back to
//! the browser), and turned into the new env file plus the first admin account.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::Deserialize;

use crate::apply::{Admin, Plan};
use km_config::Setting;
use km_config::table as t;

/// What a password looks like in a prefilled URL; sent back as is, it means "unchanged".
const MASK: &str = "********";

/// Every field of the wizard's page.
#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub struct SettingsForm {
    pub dedicated_key: String,
    /// `embedded` or `external`.
    pub stores: String,
    pub mongo_url: String,
    pub elasticsearch_url: String,
    pub redis_url: String,
    pub site_url: String,
    pub smtp_host: String,
    pub smtp_port: String,
    pub smtp_user: String,
    pub smtp_password: String,
    pub smtp_sender: String,
    /// `none`, `starttls` or `tls`.
    pub smtp_tls: String,
    pub test_mail_to: String,
    /// `off`, `acme` or `files`.
    pub tls: String,
    pub acme_directory: String,
    pub acme_email: String,
    pub acme_ca: String,
    pub tls_cert_pem: String,
    pub tls_key_pem: String,
    /// A checkbox: `on` when ticked.
    pub allow_signup: String,
    pub admin_username: String,
    pub admin_email: String,
    pub admin_password: String,
    /// Shown only: whether a licence / SMTP password is already set.
    #[serde(skip)]
    pub has_licence: bool,
    #[serde(skip)]
    pub has_smtp_password: bool,
}

/// `scheme://user:password@host` with the password replaced by the mask.
fn mask_url(url: &str) -> String {
    match password_span(url) {
        Some((start, end)) => format!("{}{MASK}{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

/// Byte range of the password in `scheme://user:password@host…`.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let authority_start = url.find("://")? + 3;
    let rest = &url[authority_start..];
    let at = rest.find('@')?;
    let colon = rest[..at].find(':')?;
    Some((authority_start + colon + 1, authority_start + at))
}

/// The submitted URL, with the current password put back where the mask was left.
fn unmask_url(submitted: &str, current: Option<&String>) -> String {
    let (Some((start, end)), Some(current)) = (password_span(submitted), current) else {
        return submitted.to_string();
    };
    if &submitted[start..end] != MASK {
        return submitted.to_string();
    }
    match password_span(current) {
        Some((cs, ce)) => format!(
            "{}{}{}",
            &submitted[..start],
            &current[cs..ce],
            &submitted[end..]
        ),
        None => submitted.to_string(),
    }
}

impl SettingsForm {
    pub fn from_env(env: &BTreeMap<String, String>) -> SettingsForm {
        let get = |s: &Setting| {
            s.read(env.get(s.var).map(String::as_str))
                .unwrap_or_default()
                .to_string()
        };
        let external = [t::MONGO_URL.var, t::ELASTICSEARCH_URL.var, t::REDIS_URL.var]
            .iter()
            .any(|k| env.get(*k).is_some_and(|v| !v.is_empty()));
        SettingsForm {
            has_licence: env.get(t::DEDICATED_KEY.var).is_some_and(|k| !k.is_empty()),
            stores: if external { "external" } else { "embedded" }.into(),
            mongo_url: mask_url(&get(&t::MONGO_URL)),
            elasticsearch_url: mask_url(&get(&t::ELASTICSEARCH_URL)),
            redis_url: mask_url(&get(&t::REDIS_URL)),
            site_url: get(&t::SITE_URL),
            smtp_host: get(&t::SMTP_HOST),
            smtp_port: get(&t::SMTP_PORT),
            smtp_user: get(&t::SMTP_USER),
            has_smtp_password: env.get(t::SMTP_PASSWORD.var).is_some_and(|p| !p.is_empty()),
            smtp_sender: get(&t::SMTP_SENDER),
            smtp_tls: get(&t::SMTP_TLS),
            tls: get(&t::TLS),
            acme_directory: get(&t::ACME_DIRECTORY),
            acme_email: get(&t::ACME_EMAIL),
            acme_ca: get(&t::ACME_CA),
            allow_signup: if get(&t::ALLOW_SIGNUP) == "true" {
                "on".into()
            } else {
                String::new()
            },
            ..SettingsForm::default()
        }
    }
}

impl SettingsForm {
    /// What was typed, to show again after a failed apply: no secret goes back to the
    /// browser (passwords, the licence, the private key; URL passwords masked), and the
    /// notes say what the settings in use (`current`) hold.
    pub fn draft(&self, current: &BTreeMap<String, String>) -> SettingsForm {
        let in_use = SettingsForm::from_env(current);
        SettingsForm {
            dedicated_key: String::new(),
            smtp_password: String::new(),
            admin_password: String::new(),
            tls_key_pem: String::new(),
            mongo_url: mask_url(&self.mongo_url),
            elasticsearch_url: mask_url(&self.elasticsearch_url),
            redis_url: mask_url(&self.redis_url),
            has_licence: in_use.has_licence,
            has_smtp_password: in_use.has_smtp_password,
            ..self.clone()
        }
    }
}

/// Sets `key` to `value`, or removes it when empty.
fn put(env: &mut BTreeMap<String, String>, key: &str, value: &str) {
    match value.trim() {
        "" => env.remove(key),
        v => env.insert(key.to_string(), v.to_string()),
    };
}

/// Writes an uploaded PEM in `dir`, readable by the owner and the directory's group
/// (the appliance's `/etc/km/tls` is setgid `km`: the gateway reads it); returns its
/// path. The name holds
/// a digest of the contents (`cert-<digest>.pem`): a check, or an apply that is rolled
/// back, never overwrites the files the running km serves (it reloads them on change).
fn save_pem(dir: &Path, kind: &str, pem: &str) -> Result<String, String> {
    use sha2::Digest;
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let digest = hex::encode(sha2::Sha256::digest(pem.trim().as_bytes()));
    let path = dir.join(format!("{kind}-{}.pem", &digest[..16]));
    std::fs::write(&path, pem.trim().as_bytes())
        .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.display().to_string())
}

/// Removes the PEMs `tried` names in `pem_dir` that the settings in use (`current`) do
/// not: a check, or an apply that did not stick, leaves no uploaded key behind.
pub fn discard_uploads(
    tried: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
    pem_dir: &Path,
) {
    for var in [t::TLS_CERT.var, t::TLS_KEY.var] {
        let Some(path) = tried.get(var) else {
            continue;
        };
        let in_use = current.values().any(|v| v == path);
        if !in_use && Path::new(path).parent() == Some(pem_dir) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The new env file (the current one with the form's changes) and the admin account.
pub fn plan(
    form: &SettingsForm,
    current: &BTreeMap<String, String>,
    pem_dir: &Path,
) -> Result<Plan, String> {
    let mut env = current.clone();
    if !form.dedicated_key.trim().is_empty() {
        put(&mut env, t::DEDICATED_KEY.var, &form.dedicated_key);
    }
    for (key, value) in [
        (t::MONGO_URL.var, &form.mongo_url),
        (t::ELASTICSEARCH_URL.var, &form.elasticsearch_url),
        (t::REDIS_URL.var, &form.redis_url),
    ] {
        let value = if form.stores == "external" {
            unmask_url(value, current.get(key))
        } else {
            String::new()
        };
        put(&mut env, key, &value);
    }
    put(&mut env, t::SITE_URL.var, &form.site_url);
    put(&mut env, t::SMTP_HOST.var, &form.smtp_host);
    put(&mut env, t::SMTP_PORT.var, &form.smtp_port);
    put(&mut env, t::SMTP_USER.var, &form.smtp_user);
    put(&mut env, t::SMTP_SENDER.var, &form.smtp_sender);
    put(&mut env, t::SMTP_TLS.var, &form.smtp_tls);
    if !form.smtp_password.is_empty() || form.smtp_user.trim().is_empty() {
        put(&mut env, t::SMTP_PASSWORD.var, &form.smtp_password);
    }
    if form.smtp_host.trim().is_empty() {
        for key in [
            t::SMTP_PORT.var,
            t::SMTP_USER.var,
            t::SMTP_PASSWORD.var,
            t::SMTP_SENDER.var,
            t::SMTP_TLS.var,
        ] {
            env.remove(key);
        }
    }
    put(&mut env, t::TLS.var, &form.tls);
    put(
        &mut env,
        t::ACME_DIRECTORY.var,
        if form.tls == "acme" {
            &form.acme_directory
        } else {
            ""
        },
    );
    put(
        &mut env,
        t::ACME_EMAIL.var,
        if form.tls == "acme" {
            &form.acme_email
        } else {
            ""
        },
    );
    put(
        &mut env,
        t::ACME_CA.var,
        if form.tls == "acme" {
            &form.acme_ca
        } else {
            ""
        },
    );
    if form.tls == "files" {
        if !form.tls_cert_pem.trim().is_empty() {
            env.insert(
                t::TLS_CERT.var.into(),
                save_pem(pem_dir, "cert", &form.tls_cert_pem)?,
            );
        }
        if !form.tls_key_pem.trim().is_empty() {
            env.insert(
                t::TLS_KEY.var.into(),
                save_pem(pem_dir, "key", &form.tls_key_pem)?,
            );
        }
    } else {
        env.remove(t::TLS_CERT.var);
        env.remove(t::TLS_KEY.var);
    }
    env.insert(
        t::ALLOW_SIGNUP.var.into(),
        if form.allow_signup == "on" {
            "true"
        } else {
            "false"
        }
        .into(),
    );
    let admin = (!form.admin_username.trim().is_empty()).then(|| Admin {
        username: form.admin_username.trim().to_string(),
        email: form.admin_email.trim().to_string(),
        password: form.admin_password.clone(),
    });
    Ok(Plan {
        env,
        admin,
        test_mail_to: Some(form.test_mail_to.trim().to_string()).filter(|t| !t.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_put_back() {
        let current = "mongodb://km:s3cret@db:27017/km".to_string();
        let masked = mask_url(&current);
        assert_eq!(masked, "mongodb://km:********@db:27017/km");
        assert_eq!(unmask_url(&masked, Some(&current)), current);
        assert_eq!(
            unmask_url("mongodb://km:new@db/km", Some(&current)),
            "mongodb://km:new@db/km"
        );
        assert_eq!(mask_url("redis://cache:6379"), "redis://cache:6379");
    }

    #[test]
    fn the_plan_keeps_what_the_form_does_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let current: BTreeMap<String, String> = [
            ("KM_LISTEN", "0.0.0.0:80"),
            ("KM_DEDICATED_KEY", "km1.old"),
            ("SMTP_PASSWORD", "pw"),
            ("KM_MONGO_URL", "mongodb://u:p@db/km"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut form = SettingsForm::from_env(&current);
        assert!(form.has_licence && form.has_smtp_password && form.stores == "external");
        form.smtp_host = "mail.example.com".into();
        form.smtp_user = "km".into();
        form.site_url = "https://km.example.com".into();
        let plan = plan(&form, &current, dir.path()).unwrap();
        assert_eq!(plan.env["KM_LISTEN"], "0.0.0.0:80");
        assert_eq!(plan.env["KM_DEDICATED_KEY"], "km1.old");
        assert_eq!(plan.env["SMTP_PASSWORD"], "pw");
        assert_eq!(plan.env["KM_MONGO_URL"], "mongodb://u:p@db/km");
        assert_eq!(plan.env["KM_ALLOW_SIGNUP"], "false");
        assert!(plan.admin.is_none());
        form.stores = "embedded".into();
        let plan = super::plan(&form, &current, dir.path()).unwrap();
        assert!(!plan.env.contains_key("KM_MONGO_URL"));
    }

    #[test]
    fn uploaded_pems_never_replace_the_files_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let mut form = SettingsForm {
            tls: "files".into(),
            tls_cert_pem: "CERT ONE".into(),
            tls_key_pem: "KEY ONE".into(),
            ..SettingsForm::default()
        };
        let first = plan(&form, &BTreeMap::new(), dir.path()).unwrap().env;
        form.tls_cert_pem = "CERT TWO".into();
        let second = plan(&form, &first, dir.path()).unwrap().env;
        assert_ne!(first["KM_TLS_CERT"], second["KM_TLS_CERT"]);
        assert_eq!(first["KM_TLS_KEY"], second["KM_TLS_KEY"]);
        let read = |p: &str| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&first["KM_TLS_CERT"]), "CERT ONE");
        assert_eq!(read(&second["KM_TLS_CERT"]), "CERT TWO");
        form.tls_cert_pem = String::new();
        form.tls_key_pem = String::new();
        let kept = plan(&form, &second, dir.path()).unwrap().env;
        assert_eq!(kept["KM_TLS_CERT"], second["KM_TLS_CERT"]);
    }
}
