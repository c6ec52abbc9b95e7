//! Certificates the HTTPS port serves: PEM parsing, the swappable slot rustls reads on
//! every handshake, temporary self-signed certificates, and the expiry date of a
//! certificate.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::format_description::well_known::Rfc3339;

/// A certificate chain with its key, ready for rustls, and when it expires.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    pub not_after: Option<NotAfter>,
}

/// The end of a certificate's validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotAfter {
    /// Seconds since the Unix epoch.
    pub unix: i64,
    /// The same instant as `YYYY-MM-DDTHH:MM:SSZ`.
    pub rfc3339: String,
}

/// The provider every certificate km serves is loaded with: ring, like the rest of
/// the process (never the process default, which tests may not have installed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM text, leaf first.
pub fn parse_chain(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err("no CERTIFICATE block in it".into());
    }
    Ok(chain)
}

/// The private key of a PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no PEM private key in it: {e}"))
}

/// Pairs a chain with its key; fails when the key is not the certificate's.
pub fn pair(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Loaded, String> {
    let not_after = chain.first().and_then(|leaf| not_after(leaf));
    let key = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|e| format!("the key does not go with the certificate: {e}"))?;
    Ok(Loaded {
        key: Arc::new(key),
        not_after,
    })
}

/// Reads a certificate and its key from PEM files; errors name the file at fault with
/// `cert_var` / `key_var` (the setting the operator fixes).
pub fn load_files(
    cert: &Path,
    key: &Path,
    cert_var: &str,
    key_var: &str,
) -> Result<Loaded, String> {
    let read = |path: &Path, var: &str| {
        std::fs::read(path).map_err(|e| format!("{var}: cannot read {}: {e}", path.display()))
    };
    let chain = parse_chain(&read(cert, cert_var)?)
        .map_err(|e| format!("{cert_var}: {}: {e}", cert.display()))?;
    let private = parse_key(&read(key, key_var)?)
        .map_err(|e| format!("{key_var}: {}: {e}", key.display()))?;
    pair(chain, private).map_err(|e| {
        format!(
            "{cert_var} and {key_var} ({} and {}): {e}",
            cert.display(),
            key.display()
        )
    })
}

/// A throwaway certificate for `host`, signed by itself: HTTPS answers (with a browser
/// warning) until a real certificate arrives.
pub fn self_signed(host: &str) -> Result<Loaded, String> {
    let generated = rcgen::generate_simple_self_signed(vec![host.to_string()])
        .map_err(|e| format!("cannot make a self-signed certificate for {host:?}: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    pair(vec![generated.cert.der().clone()], key)
}

/// The certificate slot of the HTTPS port: read on every handshake, replaced whole, so a
/// new certificate applies to new connections while open ones keep theirs.
#[derive(Debug)]
pub struct Slot(RwLock<Arc<CertifiedKey>>);

impl Slot {
    pub fn new(key: Arc<CertifiedKey>) -> Self {
        Slot(RwLock::new(key))
    }

    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write() = key;
    }
}

impl ResolvesServerCert for Slot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

/// The rustls configuration of the HTTPS port: HTTP/2 and HTTP/1.1, certificate from `slot`.
pub fn server_config(slot: Arc<Slot>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `notAfter` of a DER certificate; `None` if it does not parse.
pub fn not_after(der: &[u8]) -> Option<NotAfter> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = certificate.validity().not_after.to_datetime();
    Some(NotAfter {
        unix: at.unix_timestamp(),
        rfc3339: at.format(&Rfc3339).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_until(year: i32, month: u8, day: u8) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["km.test".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn reads_not_after_in_both_time_encodings() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        let utc = not_after(&cert_until(2031, 5, 17)).unwrap();
        assert_eq!(utc.rfc3339, "2031-05-17T00:00:00Z");
        assert_eq!(utc.unix, 1_936_742_400);
        let generalized = not_after(&cert_until(2051, 1, 2)).unwrap();
        assert_eq!(generalized.rfc3339, "2051-01-02T00:00:00Z");
        assert!(not_after(b"\x30\x03\x02\x01\x01").is_none());
        assert!(not_after(b"").is_none());
    }

    #[test]
    fn pairs_only_a_key_with_its_certificate() {
        let a = rcgen::generate_simple_self_signed(vec!["a.test".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.test".into()]).unwrap();
        let chain = parse_chain(a.cert.pem().as_bytes()).unwrap();
        let good = parse_key(a.signing_key.serialize_pem().as_bytes()).unwrap();
        let wrong = parse_key(b.signing_key.serialize_pem().as_bytes()).unwrap();
        assert!(pair(chain.clone(), good).is_ok());
        let err = pair(chain, wrong).unwrap_err();
        assert!(err.contains("does not go with"), "{err}");
        assert!(parse_chain(b"not pem").is_err());
        assert!(parse_key(a.cert.pem().as_bytes()).is_err());
    }

    #[test]
    fn self_signed_certificate_is_served_for_the_host() {
        let loaded = self_signed("km.example.com").unwrap();
        assert!(loaded.not_after.is_some());
        assert_eq!(loaded.key.cert.len(), 1);
    }
}
