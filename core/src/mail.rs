//! The SMTP transport notifications go through, as the settings say; the SMTP check of
//! `km config check` and the wizard tries this same transport.

use std::time::Duration;

use km_config::{SmtpSettings, SmtpTls};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, Tokio1Executor};

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
