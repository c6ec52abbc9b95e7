//! The setup wizard (`km-wizard`) end to end, against real servers: SecantusDB (MongoDB
//! wire), osmem-server (OpenSearch API), redis-server, aiosmtpd (STARTTLS + AUTH, mail
//! into a Maildir) and Pebble (ACME). The wizard runs `km serve` itself
//! (`--restart process`) on the env file it writes, as it does outside systemd.
//!
//! - the whole setup in Chromium (`tests/js/wizard.js`): every section filled and
//!   checked, Apply, the progress followed to Done; then km answers over HTTPS with a
//!   certificate from Pebble, the env file holds the settings, the admin signs in, the
//!   wizard answers 403. Screenshots go to `<target>/e2e-screenshots/wizard/`.
//! - failures named, and nothing written: through the check endpoint, an apply, and once
//!   through the page.
//! - the token: every route refuses a missing or wrong one, the lock, `reopen`, 429.
//! - a restart that fails is rolled back to the previous settings.
//! - `km-wizard apply --settings`, headless.
//!
//! Needs the binaries built with the test licence key trusted:
//! `cargo build --workspace --all-targets --features km-appliance/test-licence` (as
//! `tests/run.sh` does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use km_e2e::{
    OsMem, Pebble, Redis, SecantusDb, Smtp, TestCa, Wizard, WizardOpts, clean_setup_env, e2e,
    free_port, install_crypto, km_bin, run_node_script, show, target_dir, wizard_bin,
};
use reqwest::Method;
use serde_json::{Value, json};

const ADMIN: &str = "admin";
const ADMIN_EMAIL: &str = "admin@example.com";
const ADMIN_PASSWORD: &str = "correct horse 42";
const MAIL_USER: &str = "km@example.com";
const MAIL_PASSWORD: &str = "mail-pw-1";
const MAIL_TO: &str = "ops@example.com";
const CUSTOMER: &str = "Wizard e2e";
/// Enough for an apply: checks, km stopped and started on external stores, the admin.
const APPLY_TIMEOUT: Duration = Duration::from_secs(150);
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// `km licence sign` with the test key, valid `days` from now.
fn sign_licence(days: u32) -> Result<String> {
    let out = std::process::Command::new(km_bin())
        .args(["licence", "sign", "--key"])
        .arg(test_key_path())
        .args(["--customer", CUSTOMER, "--process-limit", "0"])
        .args(["--days", &days.to_string()])
        .output()
        .context("run km licence sign")?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && text.starts_with("km1."),
        "km licence sign exited {}: {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = std::process::Command::new(km_bin())
        .args(["licence", "show", "--licence", &text])
        .output()
        .context("run km licence show")?;
    ensure!(
        shown.status.success(),
        "{} refuses a licence signed with the test key ({}): build km and km-wizard with \
         `cargo build --workspace --features km-appliance/test-licence` (tests/run.sh does)",
        km_bin().display(),
        String::from_utf8_lossy(&shown.stdout).trim()
    );
    Ok(text)
}

fn test_key_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("keys/test-licence.key")
}

/// A licence signed with the test key that expired three days ago (`km licence sign`
/// takes no past dates: signed here with the same code).
fn expired_licence() -> Result<String> {
    use km_config::licence::{Licence, parse_signing_key, sign};
    let key = parse_signing_key(&std::fs::read_to_string(test_key_path())?)?;
    let now = km_e2e::now_ms() / 1000;
    let licence = Licence {
        customer: CUSTOMER.into(),
        process_limit: 0,
        expires_at: now - 3 * 86_400,
        issued_at: now - 33 * 86_400,
    };
    Ok(sign(&licence, &key))
}

/// The licence with one character of its payload changed (still base64url).
fn tampered(licence: &str) -> Result<String> {
    let mut chars: Vec<char> = licence.chars().collect();
    let at = 12; // inside the payload: "km1." + 8
    ensure!(chars.len() > 40, "licence too short: {licence}");
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    Ok(chars.into_iter().collect())
}

/// The variables of an env file, as km reads them.
fn read_env(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let entries = km_config::envfile::parse(&text).with_context(|| path.display().to_string())?;
    Ok(entries.into_iter().collect())
}

fn mode(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

fn prev_path(env_file: &Path) -> PathBuf {
    km_config::envfile::previous_path(env_file)
}

/// The checks as lines, for messages.
fn lines(checks: &[Value]) -> String {
    checks
        .iter()
        .map(|c| format!("  [{}] {}: {}", c["status"], c["setting"], c["detail"]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The check about `setting` with `status` whose detail holds `contains`.
fn find_check<'a>(
    checks: &'a [Value],
    setting: &str,
    status: &str,
    contains: &str,
) -> Result<&'a Value> {
    checks
        .iter()
        .find(|c| {
            c["setting"] == setting
                && c["status"] == status
                && c["detail"].as_str().is_some_and(|d| d.contains(contains))
        })
        .with_context(|| {
            format!(
                "no {status} check of {setting} saying {contains:?}; got:\n{}",
                lines(checks)
            )
        })
}

/// `<target>/e2e-screenshots/wizard`, emptied of earlier PNGs named `<prefix>-*`.
fn screenshot_dir(prefix: &str) -> Result<PathBuf> {
    let dir = target_dir().join("e2e-screenshots/wizard");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with(&format!("{prefix}-")) && n.ends_with(".png")) {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(dir)
}

/// Runs `tests/js/wizard.js` on `plan`; its output when every step passed.
async fn browse(plan: &Value, shots: &Path) -> Result<String> {
    let dir = tempfile::Builder::new()
        .prefix("km-wizard-plan-")
        .tempdir()?;
    let file = dir.path().join("plan.json");
    std::fs::write(&file, serde_json::to_vec_pretty(plan)?)?;
    let (file, shots) = (file.to_string_lossy(), shots.to_string_lossy());
    let out = run_node_script(
        "wizard.js",
        &[("WIZARD_PLAN", &file), ("WIZARD_SCREENSHOT_DIR", &shots)],
        SCRIPT_TIMEOUT,
    )
    .await?;
    println!("{}", out.stdout.trim_end());
    ensure!(
        out.stdout.contains("wizard: all steps passed"),
        "wizard.js exited 0 without its closing line:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    Ok(out.stdout)
}

/// A client trusting only `root_pem`.
fn https_client(root_pem: &str) -> Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem.as_bytes())?)
        .timeout(Duration::from_secs(15))
        .build()?)
}

/// Signs in with the password grant; the signed-in user (`/api/users/isLogged`).
async fn sign_in(http: &reqwest::Client, base: &str) -> Result<Value> {
    let answer = http
        .post(format!("{base}/api/oauth/token"))
        .json(&json!({"grant_type": "password", "username": ADMIN, "password": ADMIN_PASSWORD}))
        .send()
        .await
        .with_context(|| format!("POST {base}/api/oauth/token"))?;
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or_default();
    let token = body["access_token"]
        .as_str()
        .with_context(|| format!("password grant: HTTP {status}: {body}"))?;
    let user: Value = http
        .get(format!("{base}/api/users/isLogged"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    Ok(user)
}

/// Polls km's `/healthz` (plain port) until `pred` holds.
async fn wait_health(
    wizard: &Wizard,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match wizard.km_health().await {
            Ok(health) if pred(&health) => return Ok(health),
            Ok(health) => show(&health, 2000),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "km: {what} not within {timeout:?}; last /healthz: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The steps of a finished progress, as `(state, detail)`.
fn steps(progress: &Value) -> Vec<(String, String)> {
    progress["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .map(|s| {
                    (
                        s["state"].as_str().unwrap_or_default().to_string(),
                        s["detail"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The whole setup in a real browser. The wizard's ACME trial order and km's real order
/// are answered on different ports (the wizard's, then km's `KM_LISTEN`) while Pebble
/// validates HTTP-01 on one port only, so Pebble runs with `PEBBLE_VA_ALWAYS_VALID=1`:
/// both orders are real (account, order, challenge, and for km finalization and the
/// certificate), only the fetch of the challenge is skipped. The gateway's own tests
/// cover real HTTP-01 validation. The site URL (`https://localhost:<KM_HTTPS_LISTEN>`)
/// cannot reach the wizard's probe before km serves HTTPS, so its check is a warning.
/// The wizard trusts the mail server's private CA through `SSL_CERT_FILE`, as an
/// operator adding it to the system's trust store would.
#[tokio::test]
async fn whole_setup_in_a_browser_against_real_services() {
    e2e(async {
        install_crypto();
        let t0 = Instant::now();
        let mongo = SecantusDb::start()?;
        let search = OsMem::start()?;
        let redis = Redis::start()?;
        let smtp = Smtp::start("starttls", MAIL_USER, MAIL_PASSWORD)?;
        let pebble = Pebble::start(free_port()?, true)?;
        let wizard = Wizard::start(WizardOpts {
            env: vec![(
                "SSL_CERT_FILE".into(),
                smtp.ca_path().to_string_lossy().into_owned(),
            )],
            ..WizardOpts::default()
        })
        .await?;
        let base = std::fs::read(wizard.env_file())?;
        let shots = screenshot_dir("setup")?;
        println!("wizard test: screenshots go to {}", shots.display());
        let licence = sign_licence(30)?;
        let site = format!("https://localhost:{}", wizard.https_port());
        let smtp_port = smtp.port().to_string();
        let plan = json!({
            "name": "setup",
            "url": wizard.setup_url(),
            "heading": "Set up this appliance",
            "sections": [
                {"id": "licence", "fill": [["dedicated_key", licence]], "check": true,
                 "expect": [{"status": "ok", "contains": format!("customer \"{CUSTOMER}\", unlimited processes")}],
                 "forbid": ["failed", "warning"]},
                {"id": "stores", "check": true,
                 "fill": [["stores", "external"], ["mongo_url", mongo.url("km")],
                          ["elasticsearch_url", search.url()], ["redis_url", redis.url()]],
                 "expect": [
                    {"status": "ok", "contains": "database km: write, read and delete work"},
                    {"status": "ok", "contains": "index templates can be created"},
                    {"status": "ok", "contains": "set, get and delete work"}],
                 "forbid": ["failed", "warning"]},
                {"id": "site", "fill": [["site_url", site]], "check": true,
                 "expect": [{"status": "warning", "contains": "agents and browsers must be able to reach it"}],
                 "forbid": ["failed"]},
                {"id": "smtp", "check": true,
                 "fill": [["smtp_host", "127.0.0.1"], ["smtp_port", smtp_port], ["smtp_tls", "starttls"],
                          ["smtp_user", MAIL_USER], ["smtp_password", MAIL_PASSWORD],
                          ["smtp_sender", MAIL_USER], ["test_mail_to", MAIL_TO]],
                 "expect": [{"status": "ok", "contains": format!("with STARTTLS, logged in as {MAIL_USER}; it accepted the test mail to {MAIL_TO}: 250")}],
                 "forbid": ["failed", "warning"]},
                {"id": "tls", "check": true,
                 "fill": [["tls", "acme"], ["acme_directory", pebble.directory()],
                          ["acme_email", MAIL_TO], ["acme_ca", pebble.https_ca_path()]],
                 "expect": [{"status": "ok", "contains": "the CA validated a trial order for localhost over HTTP-01"}],
                 "forbid": ["failed", "warning"]},
                {"id": "access", "check": false,
                 "fill": [["admin_username", ADMIN], ["admin_email", ADMIN_EMAIL],
                          ["admin_password", ADMIN_PASSWORD]]}
            ],
            "apply": {
                "succeeded": true, "heading": "Done", "timeout_ms": APPLY_TIMEOUT.as_millis() as u64,
                "contains": [format!("{ADMIN} can sign in as admin"), "the appliance answers healthy",
                             "the wizard is locked"],
                "then_status": 403
            }
        });
        let t_browser = Instant::now();
        browse(&plan, &shots).await?;
        println!(
            "wizard test: browser done in {:.1} s",
            t_browser.elapsed().as_secs_f64()
        );

        // The test mail came through STARTTLS + AUTH, once: the section's check sent it,
        // the apply of the same SMTP settings does not send another.
        let mails = smtp.mails()?;
        ensure!(mails.len() == 1, "{} test mails in the Maildir, expected one", mails.len());
        for mail in &mails {
            ensure!(
                mail.contains("Subject: KM appliance test mail")
                    && mail.contains(&format!("To: {MAIL_TO}"))
                    && mail.contains(&format!("From: {MAIL_USER}")),
                "unexpected mail:\n{mail}"
            );
        }
        println!("wizard test: {} test mail(s) received", mails.len());

        // The env file: the settings, mode 0640, the previous one kept.
        let env_file = wizard.env_file();
        let env = read_env(&env_file)?;
        let https_ca = pebble.https_ca_path().to_string_lossy().into_owned();
        let directory = pebble.directory();
        let km_listen = format!("127.0.0.1:{}", wizard.km_port());
        for (key, want) in [
            ("KM_DEDICATED_KEY", licence.as_str()),
            ("KM_MONGO_URL", &mongo.url("km")),
            ("KM_ELASTICSEARCH_URL", search.url()),
            ("KM_REDIS_URL", &redis.url()),
            ("KM_SITE_URL", &site),
            ("SMTP_HOST", "127.0.0.1"),
            ("SMTP_PORT", &smtp_port),
            ("SMTP_TLS", "starttls"),
            ("SMTP_USER", MAIL_USER),
            ("SMTP_PASSWORD", MAIL_PASSWORD),
            ("SMTP_SENDER", MAIL_USER),
            ("KM_TLS", "acme"),
            ("KM_ACME_DIRECTORY", &directory),
            ("KM_ACME_EMAIL", MAIL_TO),
            ("KM_ACME_CA", &https_ca),
            ("KM_ALLOW_SIGNUP", "false"),
            ("KM_LISTEN", &km_listen),
        ] {
            ensure!(
                env.get(key).map(String::as_str) == Some(want),
                "{key} in {}: {:?}, expected {want:?}\n{env:#?}",
                env_file.display(),
                env.get(key)
            );
        }
        let text = std::fs::read_to_string(&env_file)?;
        ensure!(!text.contains(ADMIN_PASSWORD), "the admin password is in the env file");
        ensure!(mode(&env_file)? == 0o600, "env file mode {:o}", mode(&env_file)?);
        ensure!(
            std::fs::read(prev_path(&env_file))? == base,
            "{}.prev is not the env file the wizard started with",
            env_file.display()
        );

        // km on the external stores, with a certificate from Pebble.
        let health = wait_health(&wizard, "a certificate from the ACME CA", Duration::from_secs(90), |h| {
            h["status"] == "ok" && h["tls"]["certificate"] == "acme"
        })
        .await?;
        for (store, local) in [("documents", "sqlite"), ("events", "sqlite"), ("bus", "local")] {
            ensure!(
                health["stores"][store]["up"] == true && health["stores"][store]["kind"] != local,
                "km's {store} store is not the external one: {}",
                show(&health["stores"], 2000)
            );
        }
        let root = pebble.root_pem().await?;
        let https = https_client(&root)?;
        let km_https = format!("https://localhost:{}", wizard.https_port());
        let answer = https
            .get(format!("{km_https}/healthz"))
            .send()
            .await
            .context("km over HTTPS, trusting only Pebble's root")?;
        ensure!(answer.status() == 200, "HTTPS /healthz: HTTP {}", answer.status());
        // The wizard's CA for Pebble's own HTTPS is not what km's certificate chains to.
        let other = https_client(&std::fs::read_to_string(pebble.https_ca_path())?)?;
        ensure!(
            other.get(format!("{km_https}/healthz")).send().await.is_err(),
            "km's certificate is accepted by an unrelated root"
        );

        // The admin signs in over HTTPS.
        let user = sign_in(&https, &km_https).await?;
        ensure!(
            user["username"] == ADMIN && user["role"] == "admin",
            "signed in as {user}"
        );

        // The wizard is locked.
        for (method, path) in [(Method::GET, "/wizard/"), (Method::POST, "/wizard/check/licence")] {
            let answer = wizard
                .request(method.clone(), path, Some(wizard.token()), Some(&[]), None)
                .await?;
            ensure!(answer.status == 403, "{method} {path} after the setup: HTTP {}", answer.status);
        }

        // The admin's dashboard session reopens it through km's HTTPS `/wizard/reopen`.
        let browser = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes())?)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(15))
            .build()?;
        let anonymous = browser.post(format!("{km_https}/wizard/reopen")).form(&[("csrf", "x")]).send().await?;
        ensure!(anonymous.status() == 403, "/wizard/reopen without a session: HTTP {}", anonymous.status());
        let login = km_e2e::post_visitor_form(&browser, &km_https, "/login", &[("login", ADMIN), ("password", ADMIN_PASSWORD)]).await?;
        let session = login
            .headers()
            .get(reqwest::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(str::to_string)
            .with_context(|| format!("dashboard login: HTTP {} without a cookie", login.status()))?;
        // The account page's form carries the session's CSRF token; without it, refused.
        let account = browser
            .get(format!("{km_https}/account"))
            .header(reqwest::header::COOKIE, &session)
            .send()
            .await?
            .text()
            .await?;
        let marker = "name=\"csrf-token\" content=\"";
        let csrf: String = account
            .split_once(marker)
            .map(|(_, rest)| rest.chars().take_while(|c| *c != '"').collect())
            .context("no CSRF token on the account page")?;
        ensure!(account.contains("action=\"/account/wizard\""), "the account page offers no wizard reopen to the admin");
        // The button asks km, which (the wizard running) sends the same form on to it.
        let forged = browser
            .post(format!("{km_https}/account/wizard"))
            .header(reqwest::header::COOKIE, &session)
            .form(&[("csrf", "forged")])
            .send()
            .await?;
        ensure!(forged.status() == 403, "/account/wizard with a wrong CSRF token: HTTP {}", forged.status());
        let asked = browser
            .post(format!("{km_https}/account/wizard"))
            .header(reqwest::header::COOKIE, &session)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await?;
        ensure!(
            asked.status() == 307
                && asked.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()) == Some("/wizard/reopen"),
            "/account/wizard: HTTP {} to {:?}",
            asked.status(),
            asked.headers().get(reqwest::header::LOCATION)
        );
        let forged = browser
            .post(format!("{km_https}/wizard/reopen"))
            .header(reqwest::header::COOKIE, &session)
            .form(&[("csrf", "forged")])
            .send()
            .await?;
        ensure!(forged.status() == 403, "/wizard/reopen with the session but a wrong CSRF token: HTTP {}", forged.status());
        let reopen = browser
            .post(format!("{km_https}/wizard/reopen"))
            .header(reqwest::header::COOKIE, &session)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await?;
        let location = reopen
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let reopened = location
            .strip_prefix("/wizard/?token=")
            .with_context(|| format!("/wizard/reopen with the admin's session: HTTP {} to {location:?}", reopen.status()))?;
        let page = browser
            .get(format!("{km_https}/wizard/"))
            .header(reqwest::header::COOKIE, format!("km_wizard={reopened}"))
            .send()
            .await?;
        let status = page.status();
        let text = page.text().await?;
        ensure!(
            status == 200 && text.contains("Change the appliance") && !text.contains("admin_password"),
            "the reopened wizard through km: HTTP {status}:\n{text}"
        );
        println!(
            "wizard test: whole setup verified in {:.1} s (km on {}, HTTPS with Pebble's certificate, admin signed in)",
            t0.elapsed().as_secs_f64(),
            km_https
        );
        Ok(())
    })
    .await
}

/// A wrong setting: (what, section, form, the setting named, the detail shown).
type Refusal<'a> = (&'a str, &'a str, Vec<(&'a str, String)>, &'a str, String);

/// Apply `form` on a wizard whose checks must refuse it: the progress names `reason`
/// and nothing is written.
async fn refused_apply(wizard: &Wizard, form: &[(&str, &str)], reasons: &[&str]) -> Result<()> {
    let env_file = wizard.env_file();
    let before = std::fs::read(&env_file)?;
    let progress = wizard.apply(form, APPLY_TIMEOUT).await?;
    let steps = steps(&progress);
    let first = steps.first().cloned().unwrap_or_default();
    ensure!(
        progress["succeeded"] == false && first.0 == "failed",
        "the apply was not refused: {}",
        show(&progress, 4000)
    );
    ensure!(
        first.1.starts_with("nothing was written: "),
        "the refusal does not say nothing was written: {}",
        first.1
    );
    for reason in reasons {
        ensure!(
            first.1.contains(reason),
            "the refusal does not say {reason:?}: {}",
            first.1
        );
    }
    ensure!(
        steps[1..].iter().all(|(state, _)| state == "pending"),
        "steps ran after the refusal: {steps:?}"
    );
    ensure!(std::fs::read(&env_file)? == before, "the env file changed");
    ensure!(
        !prev_path(&env_file).exists(),
        "{} was created",
        prev_path(&env_file).display()
    );
    Ok(())
}

/// Each wrong setting is named in words a user can act on, through the section's check
/// and through an apply that then writes nothing; once through the page too. The
/// wizard trusts mail server A's CA (`SSL_CERT_FILE`), not server B's.
#[tokio::test]
async fn wrong_settings_are_named_and_nothing_is_written() {
    e2e(async {
        install_crypto();
        let t0 = Instant::now();
        let _mongo = SecantusDb::start()?;
        let redis = Redis::start_with_password("right-redis-pw")?;
        let trusted = Smtp::start("starttls", MAIL_USER, MAIL_PASSWORD)?;
        let untrusted = Smtp::start("starttls", MAIL_USER, MAIL_PASSWORD)?;
        let wizard = Wizard::start(WizardOpts {
            env: vec![(
                "SSL_CERT_FILE".into(),
                trusted.ca_path().to_string_lossy().into_owned(),
            )],
            ..WizardOpts::default()
        })
        .await?;
        let closed = free_port()?;
        let expired = expired_licence()?;
        let forged = tampered(&sign_licence(30)?)?;
        let wrong_mongo = format!("mongodb://127.0.0.1:{closed}/km");
        let wrong_redis = format!("redis://:wrong-redis-pw@127.0.0.1:{}/", redis.port());
        let (trusted_port, untrusted_port) =
            (trusted.port().to_string(), untrusted.port().to_string());
        let smtp = |port: &str, password: &str| -> Vec<(&'static str, String)> {
            vec![
                ("smtp_host", "127.0.0.1".into()),
                ("smtp_port", port.to_string()),
                ("smtp_tls", "starttls".into()),
                ("smtp_user", MAIL_USER.into()),
                ("smtp_password", password.to_string()),
                ("smtp_sender", MAIL_USER.into()),
                ("test_mail_to", MAIL_TO.into()),
            ]
        };
        let cases: Vec<Refusal> = vec![
            (
                "MongoDB on a wrong port",
                "stores",
                vec![("stores", "external".into()), ("mongo_url", wrong_mongo.clone())],
                "KM_MONGO_URL",
                format!("cannot connect to 127.0.0.1:{closed}: connection refused"),
            ),
            (
                "Redis with a wrong password",
                "stores",
                vec![("stores", "external".into()), ("redis_url", wrong_redis.clone())],
                "KM_REDIS_URL",
                format!("127.0.0.1:{} refused the password (AUTH failed)", redis.port()),
            ),
            (
                "SMTP with a wrong password",
                "smtp",
                smtp(&trusted_port, "wrong-mail-pw"),
                "SMTP_PASSWORD",
                format!("127.0.0.1:{trusted_port} refused the user name or password"),
            ),
            (
                "SMTP with a certificate from an untrusted CA",
                "smtp",
                smtp(&untrusted_port, MAIL_PASSWORD),
                "SMTP_HOST",
                format!(
                    "the certificate of 127.0.0.1:{untrusted_port} is not signed by an authority this appliance trusts"
                ),
            ),
            (
                "an expired licence",
                "licence",
                vec![("dedicated_key", expired.clone())],
                "KM_DEDICATED_KEY",
                "expired on ".into(),
            ),
            (
                "a tampered licence",
                "licence",
                vec![("dedicated_key", forged.clone())],
                "KM_DEDICATED_KEY",
                "signature does not match: the licence was altered or not issued for this product"
                    .into(),
            ),
            (
                "SMTP_SENDER not an address",
                "smtp",
                vec![("smtp_host", "127.0.0.1".into()), ("smtp_sender", "not-an-address".into())],
                "SMTP_SENDER",
                "\"not-an-address\" is not an email address".into(),
            ),
        ];
        for (what, section, form, setting, detail) in &cases {
            let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let t = Instant::now();
            let checks = wizard.check(section, &form).await?;
            let found = find_check(&checks, setting, "failed", detail)
                .with_context(|| format!("{what}: the {section} check"))?;
            let shown = found["detail"].as_str().unwrap_or_default();
            ensure!(
                !shown.starts_with(&format!("{setting}:")),
                "{what}: the detail repeats the variable: {shown}"
            );
            for secret in ["wrong-redis-pw", "wrong-mail-pw", MAIL_PASSWORD] {
                ensure!(!shown.contains(secret), "{what}: a password is shown: {shown}");
            }
            refused_apply(&wizard, &form, &[&format!("{setting}: "), detail])
                .await
                .with_context(|| format!("{what}: the apply"))?;
            println!(
                "wizard test: {what}: [{setting}] {shown} ({} ms, check and refused apply)",
                t.elapsed().as_millis()
            );
        }
        ensure!(
            trusted.mails()?.is_empty() && untrusted.mails()?.is_empty(),
            "a test mail went through a refused setting"
        );

        // An unreachable site URL is a warning, not a failure.
        let unreachable = format!("http://127.0.0.1:{closed}");
        let checks = wizard.check("site", &[("site_url", &unreachable)]).await?;
        find_check(
            &checks,
            "KM_SITE_URL",
            "warning",
            &format!(
                "could not reach {unreachable}/.well-known/km-setup-probe from inside the appliance: connection refused (is the server running and listening on that port?); agents and browsers must be able to reach it"
            ),
        )?;
        ensure!(
            checks.iter().all(|c| c["status"] != "failed"),
            "an unreachable site URL failed:\n{}",
            lines(&checks)
        );

        // Through the page: a wrong SMTP password, checked then applied.
        let shots = screenshot_dir("refused")?;
        let plan = json!({
            "name": "refused",
            "url": wizard.setup_url(),
            "heading": "Set up this appliance",
            "sections": [
                {"id": "smtp", "check": true,
                 "fill": smtp(&trusted_port, "wrong-mail-pw").into_iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
                 "expect": [{"status": "failed", "contains": format!("SMTP_PASSWORD: 127.0.0.1:{trusted_port} refused the user name or password")}]},
                {"id": "site", "check": false, "fill": [["site_url", wizard.km_url()]]}
            ],
            "apply": {
                "succeeded": false, "heading": "Not applied", "timeout_ms": APPLY_TIMEOUT.as_millis() as u64,
                "contains": ["nothing was written: SMTP_PASSWORD: ", "refused the user name or password", "Back to the settings"],
                "then_status": 200
            }
        });
        let env_before = std::fs::read(wizard.env_file())?;
        browse(&plan, &shots).await?;
        ensure!(std::fs::read(wizard.env_file())? == env_before, "the env file changed");
        ensure!(!prev_path(&wizard.env_file()).exists(), ".prev was created");
        wait_health(&wizard, "still healthy on the first settings", Duration::from_secs(5), |h| {
            h["status"] == "ok"
        })
        .await?;
        println!(
            "wizard test: refusals verified in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Ok(())
    })
    .await
}

/// The wizard's routes, each with its method.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/wizard"),
    ("GET", "/wizard/"),
    ("GET", "/wizard/progress"),
    ("GET", "/wizard/progress.json"),
    ("GET", "/wizard/assets/wizard.js"),
    ("GET", "/wizard/assets/wizard.css"),
    ("POST", "/wizard/check/licence"),
    ("POST", "/wizard/check/x"),
    ("POST", "/wizard/apply"),
];

/// A loopback address of its own (the wizard counts wrong tokens per address).
fn from(last: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
}

/// The status of each route with `token` as cookie (or, with `in_query`, as `?token=`).
async fn statuses(
    wizard: &Wizard,
    routes: &[(&str, &str)],
    token: Option<&str>,
    in_query: bool,
    source: Option<IpAddr>,
) -> Result<Vec<(String, u16, String)>> {
    let mut out = Vec::new();
    for (method, path) in routes {
        let method: Method = method.parse()?;
        let (path, cookie) = match (token, in_query) {
            (Some(t), true) => (format!("{path}?token={t}"), None),
            _ => (path.to_string(), token),
        };
        let form: Option<&[(&str, &str)]> = (method == Method::POST).then_some(&[]);
        let answer = wizard
            .request(method.clone(), &path, cookie, form, source)
            .await?;
        out.push((format!("{method} {path}"), answer.status, answer.text));
    }
    Ok(out)
}

fn all_refused(answers: &[(String, u16, String)], what: &str) -> Result<()> {
    for (route, status, text) in answers {
        ensure!(
            *status == 403 && text.contains("sudo km-wizard reopen") && !text.contains("<"),
            "{what}: {route} answered {status} {text:?}, expected 403 saying how to get a link"
        );
    }
    Ok(())
}

/// Every route needs the token: missing or wrong → 403, the lock closes them all (the
/// progress excepted, for the token of the apply that locked it, until a reopen), a
/// reopen issues a new token and retires the old one, and ten wrong tokens from one
/// address make it wait (429), even with the right token.
#[tokio::test]
async fn every_route_needs_the_current_token() {
    e2e(async {
        install_crypto();
        let mut wizard = Wizard::start(WizardOpts::default()).await?;
        let first = wizard.token().to_string();
        let wrong = "0".repeat(first.len());

        all_refused(&statuses(&wizard, ROUTES, None, false, from(2)).await?, "no token")?;
        all_refused(&statuses(&wizard, ROUTES, Some(&wrong), false, from(3)).await?, "a wrong token")?;
        all_refused(
            &statuses(&wizard, ROUTES, Some(&wrong), true, from(4)).await?,
            "a wrong ?token=",
        )?;
        let other = wizard.request(Method::GET, "/anything", None, None, from(2)).await?;
        ensure!(other.status == 403, "GET /anything: HTTP {}", other.status);

        // The right token opens every route (the apply comes below).
        let open = statuses(&wizard, &ROUTES[..ROUTES.len() - 1], Some(&first), false, None).await?;
        for (route, status, text) in &open {
            let want = if route == "GET /wizard" { 303 } else { 200 };
            ensure!(*status == want, "{route} with the token: HTTP {status}: {text}");
        }
        // `?token=` becomes an HttpOnly cookie and leaves the address bar.
        let entry = wizard
            .request(Method::GET, &format!("/wizard/?token={first}"), None, None, from(5))
            .await?;
        ensure!(
            entry.status == 303 && entry.location.as_deref() == Some("/wizard/"),
            "GET /wizard/?token=: HTTP {} to {:?}",
            entry.status,
            entry.location
        );
        let cookie = entry.set_cookie.clone().unwrap_or_default();
        ensure!(
            cookie.starts_with(&format!("km_wizard={first};"))
                && cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Lax"),
            "set-cookie: {cookie}"
        );

        // Ten wrong tokens from one address: it waits, even with the right token; other
        // addresses do not.
        for n in 1..=10 {
            let answer = wizard.request(Method::GET, "/wizard/", Some(&wrong), None, from(6)).await?;
            ensure!(answer.status == 403, "wrong token #{n}: HTTP {}", answer.status);
        }
        for token in [&wrong, &first] {
            let answer = wizard.request(Method::GET, "/wizard/", Some(token), None, from(6)).await?;
            ensure!(
                answer.status == 429 && answer.text.contains("too many attempts"),
                "after ten wrong tokens: HTTP {} {:?}",
                answer.status,
                answer.text
            );
        }
        let elsewhere = wizard.request(Method::GET, "/wizard/", Some(&first), None, None).await?;
        ensure!(elsewhere.status == 200, "another address: HTTP {}", elsewhere.status);

        // Through km's `/wizard/` (KM_WIZARD_URL): the page is there, and wrong tokens are
        // counted against the address km saw, whatever X-Forwarded-For the client sends.
        let via_km = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .local_address(from(20))
            .timeout(Duration::from_secs(15))
            .build()?;
        let through = |token: &str, forged: String| {
            via_km
                .get(format!("{}/wizard/", wizard.km_url()))
                .header(reqwest::header::COOKIE, format!("km_wizard={token}"))
                .header("x-forwarded-for", forged)
                .send()
        };
        let page = through(&first, "10.9.0.1".into()).await?;
        let status = page.status().as_u16();
        let text = page.text().await?;
        ensure!(
            status == 200 && text.contains("Set up this appliance"),
            "GET /wizard/ through km: HTTP {status}: {text}"
        );
        for n in 1..=10 {
            let status = through(&wrong, format!("10.9.0.{n}")).await?.status().as_u16();
            ensure!(status == 403, "wrong token #{n} through km: HTTP {status}");
        }
        let status = through(&first, "10.9.0.99".into()).await?.status().as_u16();
        ensure!(
            status == 429,
            "ten wrong tokens through km with forged X-Forwarded-For values: HTTP {status}, expected 429"
        );

        // Apply: the wizard locks itself.
        let site = wizard.km_url();
        let progress = wizard
            .apply(
                &[
                    ("site_url", &site),
                    ("tls", "off"),
                    ("admin_username", ADMIN),
                    ("admin_email", ADMIN_EMAIL),
                    ("admin_password", ADMIN_PASSWORD),
                ],
                APPLY_TIMEOUT,
            )
            .await?;
        ensure!(progress["succeeded"] == true, "apply: {}", show(&progress, 4000));
        ensure!(wizard.state_dir().join("locked").exists(), "no lock file");
        let locked = statuses(&wizard, ROUTES, Some(&first), false, from(7)).await?;
        for (route, status, text) in &locked {
            // The apply's own token still reads its outcome (the page's last refresh
            // comes after the lock) and the stylesheet; nothing else.
            let readable = route.starts_with("GET /wizard/progress") || route.starts_with("GET /wizard/assets/");
            let want = if readable { 200 } else { 403 };
            ensure!(*status == want, "after the lock, {route}: HTTP {status} {text:?}, expected {want}");
        }
        let closed: Vec<(&str, &str)> = ROUTES
            .iter()
            .filter(|(_, path)| !path.starts_with("/wizard/progress") && !path.starts_with("/wizard/assets/"))
            .copied()
            .collect();
        all_refused(
            &statuses(&wizard, &closed, Some(&first), true, from(8)).await?,
            "after the lock, the old ?token=",
        )?;

        // Reopen: a new token; the old one opens nothing, not even the progress.
        let second = wizard.reopen()?;
        ensure!(second != first, "reopen gave the same token");
        all_refused(&statuses(&wizard, ROUTES, Some(&first), false, from(9)).await?, "the old token after reopen")?;
        let reopened = statuses(&wizard, &ROUTES[..ROUTES.len() - 1], Some(&second), false, from(10)).await?;
        for (route, status, text) in &reopened {
            let want = if route == "GET /wizard" { 303 } else { 200 };
            ensure!(*status == want, "{route} with the new token: HTTP {status}: {text}");
        }
        let page = wizard.request(Method::GET, "/wizard/", Some(&second), None, from(10)).await?;
        ensure!(
            page.text.contains("Change the appliance") && !page.text.contains("name=\"admin_password\""),
            "after a reopen the page should change settings, not ask for a first admin:\n{}",
            page.text
        );
        Ok(())
    })
    .await
}

/// A restart that does not come up healthy is rolled back. The second apply's settings
/// pass every check (a valid certificate and key for the site's host) but km cannot
/// start on them: `KM_HTTPS_LISTEN` (from the env file) is a port this test holds open,
/// and `KM_TLS=files` makes km bind it. No wrapper around km is used.
#[tokio::test]
async fn a_restart_that_fails_is_rolled_back() {
    e2e(async {
        install_crypto();
        let mut wizard = Wizard::start(WizardOpts::default()).await?;
        // km with KM_TLS=off never binds it; the second apply's km will try.
        let _taken = std::net::TcpListener::bind(("127.0.0.1", wizard.https_port()))
            .context("hold KM_HTTPS_LISTEN's port")?;
        let site = format!("http://localhost:{}", wizard.km_port());
        let licence = sign_licence(30)?;
        let progress = wizard
            .apply(
                &[
                    ("dedicated_key", &licence),
                    ("site_url", &site),
                    ("tls", "off"),
                    ("admin_username", ADMIN),
                    ("admin_email", ADMIN_EMAIL),
                    ("admin_password", ADMIN_PASSWORD),
                ],
                APPLY_TIMEOUT,
            )
            .await?;
        ensure!(
            progress["succeeded"] == true,
            "first apply: {}",
            show(&progress, 4000)
        );
        let env_file = wizard.env_file();
        let good = std::fs::read(&env_file)?;
        wizard.reopen()?;

        let ca = TestCa::new("rollback test CA")?;
        let (cert, key) = ca.leaf(&["localhost"])?;
        let form = [
            ("site_url", site.as_str()),
            ("tls", "files"),
            ("tls_cert_pem", &cert),
            ("tls_key_pem", &key),
        ];
        let checks = wizard.check("tls", &form).await?;
        find_check(
            &checks,
            "KM_TLS_CERT",
            "ok",
            "valid for localhost and matches the key",
        )?;
        let uploaded = || -> Result<Vec<String>> {
            let dir = wizard.state_dir().join("tls");
            Ok(match std::fs::read_dir(&dir) {
                Ok(entries) => entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect(),
                Err(_) => Vec::new(),
            })
        };
        ensure!(
            uploaded()?.is_empty(),
            "a check left uploaded PEMs: {:?}",
            uploaded()?
        );
        let t = Instant::now();
        let progress = wizard.apply(&form, APPLY_TIMEOUT).await?;
        let steps = steps(&progress);
        ensure!(
            progress["succeeded"] == false
                && steps.len() == 5
                && steps[0].0 == "done"
                && steps[1].0 == "done"
                && steps[2].0 == "failed",
            "the second apply should fail at the restart: {}",
            show(&progress, 4000)
        );
        let why = &steps[2].1;
        for said in [
            "km exited",
            "the previous settings were restored and the services restarted on them",
        ] {
            ensure!(
                why.contains(said),
                "the failure does not say {said:?}: {why}"
            );
        }
        ensure!(
            wizard.log().contains(&format!(
                "KM_HTTPS_LISTEN: cannot listen on 127.0.0.1:{}",
                wizard.https_port()
            )),
            "km's reason is not in the wizard's log"
        );
        let page = wizard
            .request(
                Method::GET,
                "/wizard/progress",
                Some(wizard.token()),
                None,
                None,
            )
            .await?;
        ensure!(
            page.status == 200
                && page.text.contains("Not applied")
                && page.text.contains("previous settings were restored"),
            "the progress page: HTTP {}:\n{}",
            page.status,
            page.text
        );
        ensure!(
            std::fs::read(&env_file)? == good,
            "the env file is not the previous one"
        );
        ensure!(
            uploaded()?.is_empty(),
            "a failed apply left uploaded PEMs: {:?}",
            uploaded()?
        );
        // Back to the settings: what was typed is there again, no secret.
        let back = wizard
            .request(Method::GET, "/wizard/", Some(wizard.token()), None, None)
            .await?;
        let body_line = |pem: &str| pem.lines().nth(1).unwrap_or_default().to_string();
        ensure!(
            back.status == 200
                && back.text.contains("id=\"draft\"")
                && back.text.contains(&body_line(&cert))
                && !back.text.contains(&body_line(&key)),
            "the settings page after the failed apply: HTTP {}:\n{}",
            back.status,
            back.text
        );
        ensure!(
            mode(&env_file)? == 0o600,
            "env file mode {:o}",
            mode(&env_file)?
        );
        ensure!(
            read_env(&env_file)?["KM_TLS"] == "off",
            "KM_TLS is not back to off"
        );
        let health = wait_health(&wizard, "healthy again", Duration::from_secs(10), |h| {
            h["status"] == "ok" && h["tls"]["mode"] == "off"
        })
        .await?;
        let user = sign_in(&reqwest::Client::new(), &wizard.km_url()).await?;
        ensure!(
            user["role"] == "admin",
            "after the rollback, signed in as {user}"
        );
        println!(
            "wizard test: failed restart rolled back in {:.1} s: {why}; km healthy again ({})",
            t.elapsed().as_secs_f64(),
            health["status"]
        );
        // Still open for another try.
        let again = wizard
            .request(Method::GET, "/wizard/", Some(wizard.token()), None, None)
            .await?;
        ensure!(
            again.status == 200,
            "the wizard after a failed apply: HTTP {}",
            again.status
        );
        Ok(())
    })
    .await
}

/// What `km-wizard apply` printed, and how it exited.
struct Headless {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
    /// Whether km answered `/healthz` with `ok` on `watch` while the apply ran.
    seen_healthy: bool,
}

/// `km-wizard apply --settings <text> --restart process`, polling `watch`'s `/healthz`
/// meanwhile.
async fn headless(dir: &Path, settings: &str, watch: Option<u16>) -> Result<Headless> {
    let file = dir.join("settings.env");
    std::fs::write(&file, settings)?;
    let mut command = std::process::Command::new(wizard_bin());
    command
        .arg("apply")
        .arg("--settings")
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--env-file")
        .arg(dir.join("km.env"))
        .args(["--restart", "process", "--km-bin"])
        .arg(km_bin())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clean_setup_env(&mut command);
    let child = tokio::process::Command::from(command)
        .kill_on_drop(true)
        .spawn()
        .context("spawn km-wizard apply")?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()?;
    let deadline = tokio::time::sleep(APPLY_TIMEOUT);
    tokio::pin!(deadline);
    let mut seen_healthy = false;
    let out = loop {
        tokio::select! {
            out = &mut output => break out?,
            _ = &mut deadline => bail!("km-wizard apply did not finish within {APPLY_TIMEOUT:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)), if watch.is_some() && !seen_healthy => {
                if let Some(port) = watch
                    && let Ok(answer) = http.get(format!("http://127.0.0.1:{port}/healthz")).send().await
                    && let Ok(body) = answer.json::<Value>().await
                {
                    seen_healthy = body["status"] == "ok";
                }
            }
        }
    };
    let result = Headless {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: km_e2e::strip_ansi(&String::from_utf8_lossy(&out.stderr)),
        seen_healthy,
    };
    println!(
        "--- km-wizard apply exited {} ---\n{}\n--- its stderr, last lines ---\n{}",
        result.status,
        result.stdout.trim_end(),
        result
            .stderr
            .lines()
            .rev()
            .take(8)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(result)
}

/// `km-wizard apply --settings FILE`: success writes the env file (without the
/// `WIZARD_*` entries), runs km until healthy, creates the admin, locks, and leaves no
/// km behind; failure exits non-zero with the reasons and writes nothing.
#[tokio::test]
async fn headless_apply_writes_or_refuses_with_reasons() {
    e2e(async {
        install_crypto();
        let dir = tempfile::Builder::new().prefix("km-wizard-headless-").tempdir()?;
        let port = free_port()?;
        let data = dir.path().join("data");
        let licence = sign_licence(30)?;
        let settings = format!(
            "KM_LISTEN=127.0.0.1:{port}\nKM_DATA_DIR={}\nKM_DEDICATED_KEY={licence}\nKM_SITE_URL=http://127.0.0.1:{port}\n\
             WIZARD_ADMIN_USERNAME={ADMIN}\nWIZARD_ADMIN_EMAIL={ADMIN_EMAIL}\nWIZARD_ADMIN_PASSWORD=\"{ADMIN_PASSWORD}\"\n",
            data.display()
        );
        let t = Instant::now();
        let run = headless(dir.path(), &settings, Some(port)).await?;
        ensure!(run.status.success(), "km-wizard apply failed: {}\n{}", run.stdout, run.stderr);
        for said in [
            "ok   Check the settings: every setting checked",
            "ok   Restart the services: the appliance answers healthy",
            &format!("ok   Create the admin account: {ADMIN} can sign in as admin"),
            "ok   Lock the wizard",
        ] {
            ensure!(run.stdout.contains(said), "the output does not say {said:?}:\n{}", run.stdout);
        }
        ensure!(run.seen_healthy, "km never answered healthy on 127.0.0.1:{port} during the apply");
        let env_file = dir.path().join("km.env");
        let env = read_env(&env_file)?;
        ensure!(
            env.get("KM_DEDICATED_KEY") == Some(&licence)
                && env.get("KM_LISTEN").map(String::as_str) == Some(&format!("127.0.0.1:{port}"))
                && env.keys().all(|k| !k.starts_with("WIZARD_")),
            "the env file: {env:#?}"
        );
        ensure!(!std::fs::read_to_string(&env_file)?.contains(ADMIN_PASSWORD), "the admin password was written");
        ensure!(mode(&env_file)? == 0o600, "env file mode {:o}", mode(&env_file)?);
        ensure!(dir.path().join("state/locked").exists(), "the wizard is not locked");
        ensure!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "a km still listens on 127.0.0.1:{port} after the headless apply"
        );
        println!("wizard test: headless apply succeeded in {:.1} s", t.elapsed().as_secs_f64());

        // Refused: nothing written, the reasons printed.
        let refused_dir = tempfile::Builder::new().prefix("km-wizard-headless-").tempdir()?;
        let current = format!("KM_LISTEN=127.0.0.1:{}\nKM_DATA_DIR={}\n", free_port()?, data.display());
        let refused_env = refused_dir.path().join("km.env");
        std::fs::write(&refused_env, &current)?;
        let expired = expired_licence()?;
        let bad = format!("KM_DEDICATED_KEY={expired}\nSMTP_HOST=127.0.0.1\nSMTP_SENDER=nope\nWIZARD_ADMIN_USERNAME={ADMIN}\n");
        let run = headless(refused_dir.path(), &bad, None).await?;
        ensure!(!run.status.success(), "km-wizard apply accepted an expired licence");
        for said in [
            "FAIL Check the settings: nothing was written: ",
            "KM_DEDICATED_KEY: expired on ",
            "SMTP_SENDER: \"nope\" is not an email address",
            "admin account: admin email: not a valid address",
            "-    Write the env file: not run",
        ] {
            ensure!(run.stdout.contains(said), "the output does not say {said:?}:\n{}", run.stdout);
        }
        ensure!(
            run.stderr.contains("km-wizard: nothing was written"),
            "stderr does not end with the reason:\n{}",
            run.stderr
        );
        ensure!(std::fs::read_to_string(&refused_env)? == current, "the env file changed");
        ensure!(!prev_path(&refused_env).exists(), ".prev was created");
        ensure!(!refused_dir.path().join("state/locked").exists(), "locked after a refusal");

        // A first apply without its admin would lock everyone out: refused likewise.
        let no_admin = format!("KM_DEDICATED_KEY={licence}\nKM_SITE_URL=http://127.0.0.1:{port}\n");
        let run = headless(refused_dir.path(), &no_admin, None).await?;
        ensure!(
            !run.status.success()
                && run.stdout.contains("admin account: the first admin account is required")
                && run.stdout.contains("-    Write the env file: not run"),
            "a first apply without an admin:\n{}",
            run.stdout
        );
        ensure!(std::fs::read_to_string(&refused_env)? == current, "the env file changed");
        Ok(())
    })
    .await
}

/// The wizard's ACME trial order validated for real (no `PEBBLE_VA_ALWAYS_VALID`): the CA
/// fetches the HTTP-01 answers from km's plain port, as on an appliance where km holds
/// port 80, and km passes the challenges it does not know to the wizard.
#[tokio::test]
async fn acme_trial_order_is_validated_through_km() {
    e2e(async {
        let wizard = Wizard::start(WizardOpts::default()).await?;
        let pebble = Pebble::start(wizard.km_port(), false)?;
        let site = format!("https://localhost:{}", wizard.https_port());
        let directory = pebble.directory();
        let ca = pebble.https_ca_path().to_string_lossy().into_owned();
        let form = [
            ("site_url", site.as_str()),
            ("stores", "embedded"),
            ("tls", "acme"),
            ("acme_directory", directory.as_str()),
            ("acme_ca", ca.as_str()),
            ("acme_email", "ops@example.com"),
        ];
        let checks = wizard.check("tls", &form).await?;
        ensure!(
            checks.iter().any(|c| c["status"] == "ok"
                && c["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("validated a trial order"))),
            "the trial order through km's port: {checks:?}"
        );
        Ok(())
    })
    .await;
}
