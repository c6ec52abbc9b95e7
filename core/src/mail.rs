//! The SMTP transport notifications go through, as the settings say; the SMTP check of
//! `km config check` and the wizard tries this same transport.

use std::time::Duration;

use km_config::{SmtpSettings, SmtpTls};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// How long one SMTP command (connect, TLS, AUTH, a mail) may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// TLS per `SMTP_TLS` (rustls, the system's CAs and `extra_ca_pem` if given), login if a
/// user is set, every command bounded by [`COMMAND_TIMEOUT`].
pub fn transport(
    settings: &SmtpSettings,
    extra_ca_pem: Option<&[u8]>,
) -> Result<Transport, String> {
    let tls_parameters = || {
        let mut builder = TlsParameters::builder(settings.host.clone());
        if let Some(pem) = extra_ca_pem {
            let ca = Certificate::from_pem(pem)
                .map_err(|e| format!("the extra CA certificate is not PEM: {e}"))?;
            builder = builder.add_root_certificate(ca);
        }
        builder
            .build_rustls()
            .map_err(|e| format!("cannot set up TLS: {:#}", anyhow::Error::new(e)))
    };
    let tls = match settings.tls {
        SmtpTls::None => Tls::None,
        SmtpTls::Starttls => Tls::Required(tls_parameters()?),
        SmtpTls::Tls => Tls::Wrapper(tls_parameters()?),
    };
    let mut builder = Transport::builder_dangerous(&settings.host)
        .port(settings.port)
        .timeout(Some(COMMAND_TIMEOUT))
        .tls(tls);
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
    }
    Ok(builder.build())
}

/// A mail's subject and its text and HTML parts.
pub struct Letter {
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Mails `letter` to each of `recipients` through the SMTP server of the settings; the
/// error says what to fix (no server set, a bad address, the server's answer).
pub async fn send(
    smtp: Option<&SmtpSettings>,
    recipients: &[String],
    letter: &Letter,
) -> Result<(), String> {
    let smtp = smtp.ok_or("SMTP_HOST is not set: no mail can be sent")?;
    let from: Mailbox = smtp
        .sender
        .parse()
        .map_err(|e| format!("SMTP_SENDER {:?}: {e}", smtp.sender))?;
    let transport = transport(smtp, None)?;
    for to in recipients {
        let to: Mailbox = to.parse().map_err(|e| format!("recipient {to:?}: {e}"))?;
        let mail = Message::builder()
            .from(from.clone())
            .to(to)
            .subject(&letter.subject)
            .multipart(MultiPart::alternative_plain_html(
                letter.text.clone(),
                letter.html.clone(),
            ))
            .map_err(|e| format!("cannot build the mail: {e}"))?;
        transport
            .send(mail)
            .await
            .map_err(|e| format!("{}:{}: {e}", smtp.host, smtp.port))?;
    }
    Ok(())
}
