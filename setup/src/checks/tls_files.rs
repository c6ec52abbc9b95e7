//! `KM_TLS_CERT` and `KM_TLS_KEY`: the pair matches, covers the host, is valid now.

use super::*;
use km_tls::certs;

/// Checks a PEM certificate chain and private key (`KM_TLS=files`): both parse, the key
/// belongs to the first certificate, the chain is in order, the certificate covers
/// `host` (the host of `KM_SITE_URL`) and is valid now (a warning if it expires within
/// 14 days: km does not renew files).
pub fn check_tls_files(cert_pem: &[u8], key_pem: &[u8], host: &str) -> Check {
    tls_files_steps(cert_pem, key_pem, host).unwrap_or_else(|failed| failed)
}

fn tls_files_steps(cert_pem: &[u8], key_pem: &[u8], host: &str) -> Step<Check> {
    let chain = certs::parse_chain(cert_pem).map_err(|e| Check::failed(TLS_CERT, e))?;
    let key = certs::parse_key(key_pem).map_err(|e| Check::failed(TLS_KEY, e))?;
    key_matches(&chain, &key)?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
        Check::failed(
            TLS_CERT,
            format!("the first certificate cannot be used: {e}"),
        )
    })?;
    covers(&leaf, host)?;
    let now = UnixTime::now();
    valid_at(&leaf, &chain, now)?;
    let renew_by = now.as_secs().saturating_add(RENEW_WITHIN.as_secs());
    if let Some(end) = certs::not_after(&chain[0])
        && u64::try_from(end.unix).is_ok_and(|end| end < renew_by)
    {
        return Ok(Check::warning(
            TLS_CERT,
            format!(
                "the certificate for {host} expires at {}: renew it (km does not renew certificate files)",
                end.rfc3339
            ),
        ));
    }
    Ok(Check::ok(
        TLS_CERT,
        format!("the certificate is valid for {host} and matches the key"),
    ))
}

/// Whether `key` is the private half of the first certificate's public key.
fn key_matches(chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'_>) -> Step<()> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| {
        Check::failed(
            TLS_KEY,
            format!("unsupported private key (RSA, ECDSA P-256/P-384 or Ed25519 are): {e}"),
        )
    })?;
    let certified = rustls::sign::CertifiedKey::new(chain.to_vec(), signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(()),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(Check::failed(
                TLS_KEY,
                "the private key does not belong to the certificate (the first one in KM_TLS_CERT)",
            ))
        }
        Err(e) => Err(Check::failed(
            TLS_KEY,
            format!("cannot tell whether the key belongs to the certificate: {e}"),
        )),
    }
}

/// Whether the certificate is issued for `host`.
fn covers(leaf: &webpki::EndEntityCert<'_>, host: &str) -> Step<()> {
    let name = ServerName::try_from(host)
        .map_err(|_| Check::failed(SITE, format!("{host:?} is not a host name")))?;
    if leaf.verify_is_valid_for_subject_name(&name).is_ok() {
        return Ok(());
    }
    let names: Vec<&str> = leaf.valid_dns_names().collect();
    let holds = if names.is_empty() {
        "no host name (no DNS name in its subjectAltName)".to_string()
    } else {
        names.join(", ")
    };
    Err(Check::failed(
        TLS_CERT,
        format!(
            "the certificate is not issued for {host} (the host of KM_SITE_URL): it names {holds}"
        ),
    ))
}

/// Whether the certificate (and its chain) is valid at `at`.
fn valid_at(
    leaf: &webpki::EndEntityCert<'_>,
    chain: &[CertificateDer<'static>],
    at: UnixTime,
) -> Step<()> {
    let detail = match verify(leaf, chain, at) {
        Ok(()) => return Ok(()),
        Err(webpki::Error::CertExpired { not_after, .. }) => {
            format!("the certificate expired on {}", date(not_after))
        }
        Err(webpki::Error::CertNotValidYet { not_before, .. }) => format!(
            "the certificate is not valid before {} (is this machine's clock right?)",
            date(not_before)
        ),
        Err(webpki::Error::UnknownIssuer) => "the certificates are not a chain: put the server's certificate first, then the one that issued it, and so on".into(),
        Err(e) => format!("the certificate cannot be used: {e}"),
    };
    Err(Check::failed(TLS_CERT, detail))
}

/// Verifies the chain as given, at `at`: the file's last certificate stands in for the
/// trust anchor (whether a browser trusts it is the CA's business), so a lone
/// certificate only has its own validity and usage checked.
fn verify(
    leaf: &webpki::EndEntityCert<'_>,
    chain: &[CertificateDer<'static>],
    at: UnixTime,
) -> Result<(), webpki::Error> {
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    let usage = webpki::KeyUsage::server_auth();
    let (anchors, intermediates) = match chain {
        [_, intermediates @ .., top] => {
            (vec![webpki::anchor_from_trusted_cert(top)?], intermediates)
        }
        _ => (Vec::new(), &[][..]),
    };
    match leaf.verify_for_usage(algorithms, &anchors, intermediates, at, usage, None, None) {
        Ok(_) => Ok(()),
        // Without an anchor, webpki checks the certificate itself, then finds no issuer.
        Err(webpki::Error::UnknownIssuer) if anchors.is_empty() => Ok(()),
        Err(e) => Err(e),
    }
}

/// `2026-01-31` for a certificate time.
fn date(at: UnixTime) -> String {
    let millis = i64::try_from(at.as_secs()).unwrap_or(i64::MAX / 1000) * 1000;
    bson::DateTime::from_millis(millis)
        .try_to_rfc3339_string()
        .ok()
        .and_then(|s| s.get(..10).map(str::to_string))
        .unwrap_or_else(|| format!("{} s after 1970", at.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::*;

    /// A self-signed certificate for `names` valid until `not_after` (epoch seconds; by
    /// default far away), and its key.
    fn self_signed(names: &[&str], not_after: Option<u64>) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        if let Some(at) = not_after {
            params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(at);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn now_s() -> u64 {
        UnixTime::now().as_secs()
    }

    #[test]
    fn tls_files_matching_pair_for_the_host_passes() {
        let (cert, key) = self_signed(&["km.test"], None);
        let check = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&check, Status::Ok, "valid for km.test and matches the key");
        let (cert, key) = self_signed(&["*.example.com"], None);
        let wildcard = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.example.com");
        assert_eq!(wildcard.status, Status::Ok, "{wildcard}");
    }

    #[test]
    fn tls_files_with_a_chain_in_order_pass_and_out_of_order_fail() {
        let pki = private_pki();
        let chain = format!("{}{}", pki.cert_pem, pki.ca_pem);
        let check = check_tls_files(chain.as_bytes(), pki.key_pem.as_bytes(), "localhost");
        assert_eq!(check.status, Status::Ok, "{check}");
        let (stranger, _) = self_signed(&["ca.test"], None);
        let broken = format!("{}{stranger}", pki.cert_pem);
        let check = check_tls_files(broken.as_bytes(), pki.key_pem.as_bytes(), "localhost");
        assert_status(&check, Status::Failed, "not a chain");
    }

    #[test]
    fn tls_files_mismatched_key_fails() {
        let (cert, _) = self_signed(&["km.test"], None);
        let (_, other_key) = self_signed(&["km.test"], None);
        let check = check_tls_files(cert.as_bytes(), other_key.as_bytes(), "km.test");
        assert_status(&check, Status::Failed, "does not belong to the certificate");
        assert_eq!(check.setting, "KM_TLS_KEY");
    }

    #[test]
    fn tls_files_for_another_host_fail_naming_what_they_hold() {
        let (cert, key) = self_signed(&["other.test", "www.other.test"], None);
        let check = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&check, Status::Failed, "not issued for km.test");
        assert!(
            check.detail.contains("other.test, www.other.test"),
            "{check}"
        );
    }

    #[test]
    fn tls_files_expired_fail_and_expiring_warn() {
        let (cert, key) = self_signed(&["km.test"], Some(now_s() - 86_400));
        let expired = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&expired, Status::Failed, "the certificate expired on");
        let (cert, key) = self_signed(&["km.test"], Some(now_s() + 3 * 86_400));
        let soon = check_tls_files(cert.as_bytes(), key.as_bytes(), "km.test");
        assert_status(&soon, Status::Warning, "renew it");
    }

    #[test]
    fn tls_files_that_are_not_pem_fail() {
        let (cert, key) = self_signed(&["km.test"], None);
        let no_cert = check_tls_files(b"hello", key.as_bytes(), "km.test");
        assert_eq!(
            (no_cert.setting, no_cert.status),
            ("KM_TLS_CERT", Status::Failed)
        );
        let no_key = check_tls_files(cert.as_bytes(), cert.as_bytes(), "km.test");
        assert_eq!(
            (no_key.setting, no_key.status),
            ("KM_TLS_KEY", Status::Failed)
        );
    }
}
