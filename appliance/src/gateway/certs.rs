//! Certificates the HTTPS port serves: PEM parsing, the swappable slot rustls reads on
//! every handshake, temporary self-signed certificates, and the expiry date of a
//! certificate (read from its DER, so no X.509 library is needed for one field).

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

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

/// The provider every certificate of the gateway is loaded with: ring, like the rest of
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

/// `notAfter` of a DER certificate (RFC 5280: Certificate > TBSCertificate > Validity).
pub fn not_after(der: &[u8]) -> Option<NotAfter> {
    const SEQUENCE: u8 = 0x30;
    let (_, certificate, _) = expect(der, SEQUENCE)?;
    let (_, mut tbs, _) = expect(certificate, SEQUENCE)?;
    // The version is an optional explicit [0] field.
    if let Some((0xA0, _, rest)) = tlv(tbs) {
        tbs = rest;
    }
    // serialNumber, signature, issuer: skipped.
    for tag in [0x02, SEQUENCE, SEQUENCE] {
        tbs = expect(tbs, tag)?.2;
    }
    let (_, validity, _) = expect(tbs, SEQUENCE)?;
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, time, _) = tlv(after_not_before)?;
    parse_time(tag, time)
}

/// One DER element: (tag, contents, what follows).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        // Long form: the low bits count the length bytes that follow.
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        let len = bytes
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

fn expect(input: &[u8], tag: u8) -> Option<(u8, &[u8], &[u8])> {
    tlv(input).filter(|(t, _, _)| *t == tag)
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn parse_time(tag: u8, text: &[u8]) -> Option<NotAfter> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let full = match (tag, text.len()) {
        (0x17, 12) => {
            let century = if text.get(..2)? < "50" { "20" } else { "19" };
            format!("{century}{text}")
        }
        (0x18, 14) => text.to_string(),
        _ => return None,
    };
    if !full.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let field = |from: usize, to: usize| full.get(from..to)?.parse::<i64>().ok();
    let (year, month, day) = (field(0, 4)?, field(4, 6)?, field(6, 8)?);
    let (hour, minute, second) = (field(8, 10)?, field(10, 12)?, field(12, 14)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let unix = days_since_epoch(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(NotAfter {
        unix,
        rfc3339: format!(
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
            hour, minute, second
        ),
    })
}

/// Days from 1970-01-01 to a proleptic Gregorian date. Years are counted from March so
/// that February, with its leap day, ends each year; 400 years are exactly 146097 days.
fn days_since_epoch(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719468 days separate 0000-03-01 from 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_since_epoch_matches_known_dates() {
        assert_eq!(days_since_epoch(1970, 1, 1), 0);
        assert_eq!(days_since_epoch(2000, 3, 1), 11_017);
        assert_eq!(days_since_epoch(2024, 2, 29), 19_782);
        assert_eq!(days_since_epoch(1969, 12, 31), -1);
    }

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
