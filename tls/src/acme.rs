//! Certificates from an ACME CA (RFC 8555) with HTTP-01, through instant-acme.
//!
//! Files in `<data>/tls/` (a restart reuses them; keys are mode 0600):
//! - `account.json`: the ACME account (its private key) and the directory it belongs to;
//! - `key.pem`, `cert.pem`: the certificate's key and chain;
//! - `cert.json`: the host and directory the certificate was issued for, so a change of
//!   `KM_SITE_URL` or `KM_ACME_DIRECTORY` (staging to production) orders a new one.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier,
    NewAccount, NewOrder, Order, OrderStatus, RetryPolicy,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::certs::{self, Loaded};
use super::challenge::Challenges;
use super::{Source, Tls, with_causes};
use km_config::table;

const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
const META_FILE: &str = "cert.json";

/// Renew when fewer days than this remain (Let's Encrypt's 90-day certificates are
/// renewed after 60 days, leaving a month for retries).
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);
/// How often the expiry is checked once a certificate is in place.
const CHECK_EVERY: Duration = Duration::from_secs(12 * 3600);
/// The first retry after a failure; doubled each time up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// A whole attempt (account, validation, issuance) gives up after this: an unreachable
/// CA must not hold the renewal loop for the kernel's TCP timeouts.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(180);
/// Polling of an order while the CA validates or issues.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(90));

/// What km asks the CA for, and where it keeps what it got.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    pub email: Option<String>,
    /// PEM of the CA of the directory's own HTTPS certificate (`KM_ACME_CA`).
    pub ca: Option<PathBuf>,
    /// The site URL's host: the certificate's only name.
    pub host: String,
    /// `<data>/tls`
    pub dir: PathBuf,
}

/// The saved certificate when it was issued for these settings; otherwise why not.
pub fn load_saved(settings: &AcmeSettings) -> Result<Loaded, String> {
    let meta_path = settings.dir.join(META_FILE);
    let meta = match std::fs::read(&meta_path) {
        Ok(bytes) => serde_json::from_slice::<CertMeta>(&bytes)
            .map_err(|e| format!("{} is damaged: {e}", meta_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("no certificate in {} yet", settings.dir.display()));
        }
        Err(e) => return Err(format!("cannot read {}: {e}", meta_path.display())),
    };
    if meta.host != settings.host {
        return Err(format!(
            "the saved certificate is for {}, not for KM_SITE_URL's host {}",
            meta.host, settings.host
        ));
    }
    if meta.directory != settings.directory {
        return Err(format!(
            "the saved certificate comes from {}, not from KM_ACME_DIRECTORY {}",
            meta.directory, settings.directory
        ));
    }
    let (cert, key) = (settings.dir.join(CERT_FILE), settings.dir.join(KEY_FILE));
    certs::load_files(&cert, &key, "saved certificate", "saved key")
}

/// Keeps a valid certificate served: orders one at once when there is none (or
/// it is for other settings), then checks every 12 h and renews when fewer than 30 days
/// remain. Failures are recorded and retried with a doubling delay.
pub async fn keep_certificate(tls: Arc<Tls>, settings: AcmeSettings, shutdown: CancellationToken) {
    let mut failures = 0u32;
    loop {
        let wait = if renewal_due(tls.acme_not_after(), unix_now()) {
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return,
                attempt = renew(&tls, &settings) => attempt,
            };
            match attempt {
                Ok(()) => {
                    failures = 0;
                    CHECK_EVERY
                }
                Err(reason) => {
                    failures = failures.saturating_add(1);
                    let wait = backoff(failures);
                    tracing::warn!(
                        host = %settings.host,
                        directory = %settings.directory,
                        retry_in_s = wait.as_secs(),
                        "TLS: could not obtain a certificate: {reason}"
                    );
                    tls.record_error(reason);
                    wait
                }
            }
        } else {
            CHECK_EVERY
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Whether to order now: no certificate from the CA yet, or fewer than 30 days left.
pub fn renewal_due(not_after: Option<i64>, now: i64) -> bool {
    let margin = i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(i64::MAX);
    not_after.is_none_or(|not_after| not_after.saturating_sub(now) < margin)
}

/// The delay before retry number `failures` (1 minute, doubling, at most 6 hours).
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF
        .saturating_mul(1 << doublings)
        .min(MAX_BACKOFF)
}

/// One attempt: obtain, install (new connections get it at once), save.
async fn renew(tls: &Tls, settings: &AcmeSettings) -> Result<(), String> {
    tracing::info!(host = %settings.host, directory = %settings.directory, "TLS: ordering a certificate");
    let issued = tokio::time::timeout(ATTEMPT_TIMEOUT, issue(settings, tls.challenges()))
        .await
        .map_err(|_| format!("no certificate within {} s", ATTEMPT_TIMEOUT.as_secs()))??;
    let loaded = certs::pair(
        certs::parse_chain(issued.chain_pem.as_bytes())?,
        certs::parse_key(issued.key_pem.as_bytes())?,
    )
    .map_err(|e| format!("the CA's certificate is unusable: {e}"))?;
    let not_after = loaded.not_after.as_ref().map(|t| t.rfc3339.clone());
    tls.install(loaded, Source::Acme);
    tracing::info!(host = %settings.host, not_after = ?not_after, "TLS: certificate obtained and in use");
    if let Err(e) = save(settings, &issued) {
        // Served now; only a restart before the next renewal would order again.
        let reason = format!("certificate in use but not saved: {e}");
        tracing::error!("TLS: {reason}");
        tls.record_error(reason);
    }
    Ok(())
}

/// A certificate chain and its key, as PEM (the key is a secret: never logged).
struct Issued {
    chain_pem: String,
    key_pem: String,
}

async fn issue(settings: &AcmeSettings, challenges: &Challenges) -> Result<Issued, String> {
    let account = saved_account(settings).await?;
    let host = &settings.host;
    let mut order = authorize(&account, host, challenges).await?;
    let key_pem = order.finalize().await.map_err(|e| {
        format!(
            "the CA refused to finalize the order for {host}: {}",
            with_causes(&e)
        )
    })?;
    let chain_pem = order.poll_certificate(&POLL).await.map_err(|e| {
        format!(
            "the CA did not deliver the certificate for {host}: {}",
            with_causes(&e)
        )
    })?;
    Ok(Issued { chain_pem, key_pem })
}

/// Checks ACME settings before they are applied, without obtaining a certificate:
/// registers a throwaway account on `directory` (trusting `ca` for its HTTPS when given),
/// orders a certificate for `host` and has the CA validate it over HTTP-01, with the
/// answers served from `challenges` (which must be reachable as
/// `http://<host>/.well-known/acme-challenge/`; see [`Challenges::routes`]). The order is
/// never finalized and the account is deactivated afterwards.
///
/// Success proves: the directory answers and its HTTPS is trusted; the CA accepts the
/// email and an order for the name; the name resolves to this machine and its port 80
/// reaches `challenges`. It does not prove issuance itself (rate limits, a CAA record
/// that forbids the CA, checked at finalization).
pub async fn acme_dry_run(
    directory: &str,
    ca: Option<&Path>,
    email: Option<&str>,
    host: &str,
    challenges: &Challenges,
) -> Result<(), String> {
    let attempt = async {
        let (account, _) = create_account(directory, ca, email).await?;
        let validated = authorize(&account, host, challenges).await;
        // The account served its purpose; failing to deactivate it harms nothing.
        let _ = account.deactivate().await;
        validated.map(drop)
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .map_err(|_| {
            format!(
                "no answer from the ACME CA within {} s",
                ATTEMPT_TIMEOUT.as_secs()
            )
        })?
}

/// An account builder whose HTTP client trusts `ca` (a private CA such as Pebble's) or
/// the system's CAs.
fn builder(ca: Option<&Path>) -> Result<AccountBuilder, String> {
    match ca {
        None => Account::builder().map_err(|e| format!("ACME HTTP client: {}", with_causes(&e))),
        Some(path) => {
            check_ca(path)?;
            Account::builder_with_root(path).map_err(|e| {
                format!(
                    "{}: {}: {}",
                    table::ACME_CA.var,
                    path.display(),
                    with_causes(&e)
                )
            })
        }
    }
}

/// `KM_ACME_CA` must hold a PEM certificate (checked first: instant-acme's error would
/// not name the setting). Only the first certificate of the file is trusted.
pub fn check_ca(path: &Path) -> Result<(), String> {
    CertificateDer::from_pem_file(path).map(drop).map_err(|e| {
        format!(
            "{}: no PEM certificate in {}: {e}",
            table::ACME_CA.var,
            path.display()
        )
    })
}

async fn create_account(
    directory: &str,
    ca: Option<&Path>,
    email: Option<&str>,
) -> Result<(Account, AccountCredentials), String> {
    let contact = email.map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    builder(ca)?
        .create(&new, directory.to_string(), None)
        .await
        .map_err(|e| {
            format!(
                "{} {directory}: cannot register an account: {}",
                table::ACME_DIRECTORY.var,
                with_causes(&e)
            )
        })
}

/// `account.json`: the account and what it was registered with.
#[derive(Serialize, Deserialize)]
struct SavedAccount {
    directory: String,
    email: Option<String>,
    credentials: AccountCredentials,
}

/// The saved account of this directory, or a new one (saved before use, so a crash
/// does not leave an unknown account behind).
async fn saved_account(settings: &AcmeSettings) -> Result<Account, String> {
    let path = settings.dir.join(ACCOUNT_FILE);
    let saved = std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<SavedAccount>(&bytes).ok())
        .filter(|saved| saved.directory == settings.directory);
    if let Some(saved) = saved {
        let email_changed = saved.email != settings.email;
        let account = builder(settings.ca.as_deref())?
            .from_credentials(saved.credentials)
            .await
            .map_err(|e| {
                format!(
                    "{} {}: {}",
                    table::ACME_DIRECTORY.var,
                    settings.directory,
                    with_causes(&e)
                )
            })?;
        if email_changed {
            update_email(&account, settings).await;
        }
        return Ok(account);
    }
    let (account, credentials) = create_account(
        &settings.directory,
        settings.ca.as_deref(),
        settings.email.as_deref(),
    )
    .await?;
    let saved = SavedAccount {
        directory: settings.directory.clone(),
        email: settings.email.clone(),
        credentials,
    };
    write_json(&settings.dir, ACCOUNT_FILE, &saved, 0o600)?;
    tracing::info!(directory = %settings.directory, "TLS: ACME account registered");
    Ok(account)
}

/// Tells the CA the new contact address; the account works either way.
async fn update_email(account: &Account, settings: &AcmeSettings) {
    let contact = settings.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    match account.update_contacts(&contacts).await {
        Ok(()) => tracing::info!("TLS: ACME account contact updated to KM_ACME_EMAIL"),
        Err(e) => tracing::warn!(
            "TLS: cannot update the ACME account's contact: {}",
            with_causes(&e)
        ),
    }
}

/// Orders a certificate for `host` and answers its HTTP-01 challenges until the CA has
/// validated the name (order `ready`, not finalized).
async fn authorize(
    account: &Account,
    host: &str,
    challenges: &Challenges,
) -> Result<Order, String> {
    let identifiers = [identifier(host)];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(|e| {
            format!(
                "the ACME CA refused an order for {host}: {}",
                with_causes(&e)
            )
        })?;
    let mut published = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization
            .map_err(|e| format!("ACME authorization for {host}: {}", with_causes(&e)))?;
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            status => return Err(format!("the ACME authorization for {host} is {status:?}")),
        }
        let mut challenge = authorization
            .challenge(ChallengeType::Http01)
            .ok_or_else(|| format!("the ACME CA offers no HTTP-01 challenge for {host}"))?;
        published
            .push(challenges.publish(&challenge.token, challenge.key_authorization().as_str()));
        challenge
            .set_ready()
            .await
            .map_err(|e| format!("ACME challenge for {host}: {}", with_causes(&e)))?;
    }
    let polled = order.poll_ready(&POLL).await;
    drop(published);
    let mut failed = match polled {
        Ok(OrderStatus::Ready) => return Ok(order),
        Ok(status) => format!("order {status:?}"),
        Err(e) => with_causes(&e),
    };
    for problem in challenge_errors(&mut order).await {
        // The order's error often repeats its challenge's.
        if !failed.contains(&problem) {
            failed.push_str("; ");
            failed.push_str(&problem);
        }
    }
    Err(format!(
        "the ACME CA could not validate http://{host}/.well-known/acme-challenge/ \
         (is {host} this machine, with port 80 open?): {failed}"
    ))
}

/// The CA's reasons for failed challenges.
async fn challenge_errors(order: &mut Order) -> Vec<String> {
    let mut errors = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        let problems = state.challenges.iter().filter_map(|c| c.error.as_ref());
        errors.extend(problems.map(|problem| problem.to_string()));
    }
    errors
}

fn identifier(host: &str) -> Identifier {
    match host.parse::<IpAddr>() {
        Ok(ip) => Identifier::Ip(ip),
        Err(_) => Identifier::Dns(host.to_string()),
    }
}

/// `cert.json`
#[derive(Serialize, Deserialize)]
struct CertMeta {
    host: String,
    directory: String,
}

/// Key first, then chain, then what they are for: `load_saved` checks the pair matches.
fn save(settings: &AcmeSettings, issued: &Issued) -> Result<(), String> {
    let dir = &settings.dir;
    write_file(dir, KEY_FILE, issued.key_pem.as_bytes(), 0o600)?;
    write_file(dir, CERT_FILE, issued.chain_pem.as_bytes(), 0o644)?;
    let meta = CertMeta {
        host: settings.host.clone(),
        directory: settings.directory.clone(),
    };
    write_json(dir, META_FILE, &meta, 0o644)
}

fn write_json(dir: &Path, name: &str, value: &impl Serialize, mode: u32) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(value).map_err(|e| format!("{name}: {e}"))?;
    write_file(dir, name, &json, mode)
}

/// Writes `dir/name` whole or not at all (temp file, then rename), with `mode`.
fn write_file(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        create_private_dir(dir)?;
        let mut file = open_with_mode(&tmp, mode)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn open_with_mode(path: &Path, mode: u32) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // `mode` applies only to a new file: a leftover temp file keeps its own.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(file)
}

#[cfg(not(unix))]
fn open_with_mode(path: &Path, _mode: u32) -> std::io::Result<std::fs::File> {
    std::fs::File::create(path)
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_without_certificate_or_within_30_days() {
        let now = 1_800_000_000;
        let day = 86_400;
        assert!(renewal_due(None, now));
        assert!(renewal_due(Some(now - day), now));
        assert!(renewal_due(Some(now + 29 * day), now));
        assert!(!renewal_due(Some(now + 31 * day), now));
        assert!(!renewal_due(Some(now + 89 * day), now));
    }

    #[test]
    fn backoff_doubles_from_a_minute_up_to_six_hours() {
        let minutes = |n| backoff(n).as_secs() / 60;
        assert_eq!(
            [1, 2, 3, 4].map(minutes),
            [1, 2, 4, 8],
            "first retries come quickly"
        );
        assert_eq!(minutes(9), 256);
        assert_eq!(minutes(10), 360);
        assert_eq!(minutes(u32::MAX), 360);
    }

    #[test]
    fn ip_hosts_get_ip_identifiers() {
        assert_eq!(identifier("10.1.2.3"), Identifier::Ip([10, 1, 2, 3].into()));
        assert_eq!(
            identifier("km.example.com"),
            Identifier::Dns("km.example.com".into())
        );
    }

    #[test]
    fn saved_files_are_private_and_reloaded_only_for_the_same_settings() {
        let dir = tempfile::tempdir().unwrap();
        let settings = AcmeSettings {
            directory: "https://ca.test/dir".into(),
            email: None,
            ca: None,
            host: "km.test".into(),
            dir: dir.path().join("tls"),
        };
        let err = load_saved(&settings).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let generated = rcgen::generate_simple_self_signed(vec!["km.test".into()]).unwrap();
        let issued = Issued {
            chain_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        };
        save(&settings, &issued).unwrap();
        assert!(load_saved(&settings).is_ok());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |name: &str| {
                std::fs::metadata(settings.dir.join(name))
                    .unwrap()
                    .permissions()
                    .mode()
                    & 0o777
            };
            assert_eq!(mode(KEY_FILE), 0o600);
            assert_eq!(mode("."), 0o700);
        }
        let other_host = AcmeSettings {
            host: "other.test".into(),
            ..settings.clone()
        };
        assert!(
            load_saved(&other_host)
                .unwrap_err()
                .contains("not for KM_SITE_URL")
        );
        let production = AcmeSettings {
            directory: "https://prod.test/dir".into(),
            ..settings
        };
        assert!(
            load_saved(&production)
                .unwrap_err()
                .contains("KM_ACME_DIRECTORY")
        );
    }
}
