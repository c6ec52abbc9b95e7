//! The licence (`KM_DEDICATED_KEY`), verifiable offline:
//! `km1.<base64url(payload JSON)>.<base64url(Ed25519 signature of the payload bytes)>`.
//!
//! Only the public halves of the signing keys are compiled in. The test key is trusted
//! only with the crate feature `test-licence`, so no configuration of a release build
//! can make it accept a test licence.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "km1.";

/// Public keys whose licences this build accepts (hex). Several, so a key can be
/// rotated without refusing the licences already issued.
const PRODUCTION_KEYS: &[&str] =
    &["b3eb562e2446cb44908598c3806a5d9b67b9406c1a51a7004926a80d73da662a"];

/// Public half of `tests/keys/test-licence.key`.
#[cfg(feature = "test-licence")]
const TEST_KEY: &str = "fe9319210c7f05f7de71b5d7629a0076fa657b252db3a38625e613056409c64e";

/// What a licence grants, exactly as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Licence {
    pub customer: String,
    /// Processes monitored at most; 0 means unlimited.
    pub process_limit: u32,
    /// Epoch seconds.
    pub expires_at: i64,
    /// Epoch seconds.
    pub issued_at: i64,
}

impl Licence {
    /// The process limit, `None` when unlimited.
    pub fn max_processes(&self) -> Option<u32> {
        (self.process_limit > 0).then_some(self.process_limit)
    }
}

impl fmt::Display for Licence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "customer {:?}, ", self.customer)?;
        match self.max_processes() {
            Some(n) => write!(f, "up to {n} processes")?,
            None => write!(f, "unlimited processes")?,
        }
        write!(
            f,
            ", issued {}, expires {}",
            date(self.issued_at),
            date(self.expires_at)
        )
    }
}

/// Why a licence is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LicenceError {
    #[error("not a KM licence (expected km1.…)")]
    NotKm,
    #[error("malformed licence: {0}")]
    Malformed(&'static str),
    #[error("signature does not match: the licence was altered or not issued for this product")]
    BadSignature,
    /// Signed by a trusted key, but not understood (a licence for a newer km).
    #[error("the licence contents are not understood by this version of km: {0}")]
    Contents(String),
    #[error("expired on {}", date(*expires_at))]
    Expired { expires_at: i64 },
}

/// A signing key file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("not a licence signing key: {0}")]
pub struct KeyError(&'static str);

/// Checks the format, the signature against the keys compiled in, and the expiry.
pub fn verify(text: &str, now_s: i64) -> Result<Licence, LicenceError> {
    verify_with(text, now_s, &trusted_keys())
}

/// Whether this build trusts the test key (built with the feature `test-licence`).
pub const TEST_KEY_TRUSTED: bool = cfg!(feature = "test-licence");

/// The keys compiled in; an entry that is not a valid key is skipped (a unit test
/// makes sure there is none).
fn trusted_keys() -> Vec<VerifyingKey> {
    #[cfg(feature = "test-licence")]
    let hexes = PRODUCTION_KEYS.iter().chain([&TEST_KEY]);
    #[cfg(not(feature = "test-licence"))]
    let hexes = PRODUCTION_KEYS.iter();
    hexes.filter_map(|h| verifying_key(h)).collect()
}

fn verifying_key(hex_key: &str) -> Option<VerifyingKey> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

fn verify_with(text: &str, now_s: i64, keys: &[VerifyingKey]) -> Result<Licence, LicenceError> {
    let body = text
        .trim()
        .strip_prefix(PREFIX)
        .ok_or(LicenceError::NotKm)?;
    let (payload, signature) = body
        .split_once('.')
        .filter(|(_, s)| !s.contains('.'))
        .ok_or(LicenceError::Malformed(
            "expected km1.<payload>.<signature>",
        ))?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| LicenceError::Malformed("the payload is not base64url"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| LicenceError::Malformed("the signature is not base64url"))?;
    let signature = Signature::from_slice(&signature)
        .map_err(|_| LicenceError::Malformed("the signature is not 64 bytes"))?;
    // Strict verification: no malleable signatures, no weak keys.
    if !keys
        .iter()
        .any(|k| k.verify_strict(&payload, &signature).is_ok())
    {
        return Err(LicenceError::BadSignature);
    }
    let licence: Licence =
        serde_json::from_slice(&payload).map_err(|e| LicenceError::Contents(e.to_string()))?;
    if now_s >= licence.expires_at {
        return Err(LicenceError::Expired {
            expires_at: licence.expires_at,
        });
    }
    Ok(licence)
}

/// The licence text of `licence` signed with `key`.
pub fn sign(licence: &Licence, key: &SigningKey) -> String {
    // Serialising a struct of strings and integers cannot fail.
    let payload = serde_json::to_vec(licence).unwrap_or_default();
    let signature = key.sign(&payload);
    format!(
        "{PREFIX}{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(signature.to_bytes())
    )
}

/// A signing key file: the 32-byte secret as 64 hex digits; `#` lines are comments.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, KeyError> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err(KeyError("expected one line of 64 hex digits"));
    };
    let mut secret = [0u8; 32];
    hex::decode_to_slice(line, &mut secret)
        .map_err(|_| KeyError("expected one line of 64 hex digits"))?;
    Ok(SigningKey::from_bytes(&secret))
}

/// `YYYY-MM-DD` (UTC) of epoch seconds; the number itself if out of the calendar's range.
pub fn date(epoch_s: i64) -> String {
    epoch_s
        .checked_mul(1000)
        .and_then(|ms| bson::DateTime::from_millis(ms).try_to_rfc3339_string().ok())
        .and_then(|s| s.get(..10).map(str::to_string))
        .unwrap_or_else(|| format!("{epoch_s} (epoch seconds)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_780_000_000; // 2026-05-28
    const DAY: i64 = 86_400;

    fn test_key() -> SigningKey {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/keys/test-licence.key"
        ));
        parse_signing_key(text).unwrap()
    }

    fn random_key() -> SigningKey {
        SigningKey::from_bytes(&rand::random())
    }

    fn licence(expires_at: i64) -> Licence {
        Licence {
            customer: "Acme".into(),
            process_limit: 20,
            expires_at,
            issued_at: NOW - DAY,
        }
    }

    #[test]
    fn valid_licence_is_accepted() {
        let key = random_key();
        let text = sign(&licence(NOW + DAY), &key);
        assert!(text.starts_with("km1."));
        let got = verify_with(&format!(" {text}\n"), NOW, &[key.verifying_key()]).unwrap();
        assert_eq!(got, licence(NOW + DAY));
        assert_eq!(got.max_processes(), Some(20));
    }

    #[test]
    fn expired_licence_names_the_day() {
        let key = random_key();
        let expires_at = 1_769_817_600; // 2026-01-31T00:00:00Z
        let text = sign(&licence(expires_at), &key);
        let err = verify_with(&text, expires_at, &[key.verifying_key()]).unwrap_err();
        assert_eq!(err, LicenceError::Expired { expires_at });
        assert_eq!(err.to_string(), "expired on 2026-01-31");
    }

    #[test]
    fn tampered_payload_is_refused() {
        let key = random_key();
        let text = sign(&licence(NOW + DAY), &key);
        let (_, signature) = text.rsplit_once('.').unwrap();
        let forged = serde_json::to_vec(&Licence {
            process_limit: 0,
            ..licence(NOW + DAY)
        })
        .unwrap();
        let forged = format!("km1.{}.{signature}", URL_SAFE_NO_PAD.encode(forged));
        let err = verify_with(&forged, NOW, &[key.verifying_key()]).unwrap_err();
        assert_eq!(err, LicenceError::BadSignature);
        assert!(
            err.to_string()
                .contains("altered or not issued for this product")
        );
    }

    #[test]
    fn wrong_key_is_refused() {
        let text = sign(&licence(NOW + DAY), &random_key());
        let trusted = random_key().verifying_key();
        assert_eq!(
            verify_with(&text, NOW, &[trusted]),
            Err(LicenceError::BadSignature)
        );
        assert_eq!(verify(&text, NOW), Err(LicenceError::BadSignature));
    }

    #[test]
    fn malformed_licences_say_why() {
        let keys = [random_key().verifying_key()];
        let cases = [
            ("", LicenceError::NotKm),
            ("hello", LicenceError::NotKm),
            ("km2.abc.def", LicenceError::NotKm),
            (
                "km1.abc",
                LicenceError::Malformed("expected km1.<payload>.<signature>"),
            ),
            (
                "km1.a.b.c",
                LicenceError::Malformed("expected km1.<payload>.<signature>"),
            ),
            (
                "km1.*.AAAA",
                LicenceError::Malformed("the payload is not base64url"),
            ),
            (
                "km1.e30.*",
                LicenceError::Malformed("the signature is not base64url"),
            ),
            (
                "km1.e30.AAAA",
                LicenceError::Malformed("the signature is not 64 bytes"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(verify_with(text, NOW, &keys), Err(want), "{text:?}");
        }
        assert_eq!(
            LicenceError::NotKm.to_string(),
            "not a KM licence (expected km1.…)"
        );
    }

    #[test]
    fn signed_but_unknown_contents_are_refused() {
        let key = random_key();
        let payload =
            br#"{"customer":"Acme","process_limit":1,"expires_at":1,"issued_at":0,"seats":3}"#;
        let text = format!(
            "km1.{}.{}",
            URL_SAFE_NO_PAD.encode(payload),
            URL_SAFE_NO_PAD.encode(key.sign(payload).to_bytes())
        );
        let err = verify_with(&text, NOW, &[key.verifying_key()]).unwrap_err();
        assert!(
            matches!(err, LicenceError::Contents(ref e) if e.contains("seats")),
            "{err}"
        );
    }

    #[test]
    fn compiled_keys_are_valid_and_the_test_key_file_is_not_production() {
        assert!(PRODUCTION_KEYS.iter().all(|k| verifying_key(k).is_some()));
        let test_public = hex::encode(test_key().verifying_key().as_bytes());
        assert!(!PRODUCTION_KEYS.contains(&test_public.as_str()));
        #[cfg(feature = "test-licence")]
        assert_eq!(test_public, TEST_KEY);
    }

    #[test]
    fn signing_key_files() {
        let key = random_key();
        let file = format!("# comment\n\n{}\n", hex::encode(key.to_bytes()));
        assert_eq!(parse_signing_key(&file).unwrap().to_bytes(), key.to_bytes());
        assert!(parse_signing_key("").is_err());
        assert!(parse_signing_key("abcd").is_err());
        assert!(parse_signing_key(&format!("{file}{file}")).is_err());
    }

    #[cfg(not(feature = "test-licence"))]
    #[test]
    fn test_key_refused_without_the_feature() {
        const { assert!(!TEST_KEY_TRUSTED) };
        let text = sign(&licence(NOW + DAY), &test_key());
        assert_eq!(verify(&text, NOW), Err(LicenceError::BadSignature));
    }

    #[cfg(feature = "test-licence")]
    #[test]
    fn test_key_accepted_with_the_feature() {
        const { assert!(TEST_KEY_TRUSTED) };
        let text = sign(&licence(NOW + DAY), &test_key());
        assert_eq!(verify(&text, NOW), Ok(licence(NOW + DAY)));
    }

    #[test]
    fn licence_display() {
        let l = Licence {
            process_limit: 0,
            ..licence(1_769_817_600)
        };
        assert_eq!(
            l.to_string(),
            "customer \"Acme\", unlimited processes, issued 2026-05-27, expires 2026-01-31"
        );
    }
}
