//! `SMTP_*`: TLS as `SMTP_TLS` says, login, a test mail; and the transport notifications go through.

use super::*;
use km_core::mail;
use lettre::message::Mailbox;
use lettre::{AsyncTransport, Message};

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

async fn smtp_steps(
    settings: &SmtpSettings,
    recipient: Option<&str>,
    options: &SmtpCheckOptions,
) -> Step<Check> {
    let mail = recipient.map(|to| test_mail(settings, to)).transpose()?;
    let transport = mail::transport(settings, options.extra_ca_pem.as_deref())
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
                mail::COMMAND_TIMEOUT.as_secs()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::*;

    /// A private CA and a certificate it signed for 127.0.0.1 and localhost.
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
}
