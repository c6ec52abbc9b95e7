//! The licence (`KM_DEDICATED_KEY`), verifiable offline:
//! `km1.<base64url(payload JSON)>.<base64url(Ed25519 signature of the payload bytes)>`.
//!
//! Only the public halves of the signing keys are compiled in, given at build time in
//! `KM_LICENCE_PUBLIC_KEYS` (hex, separated by spaces or commas; `km licence keygen`
//! prints one). A build without them verifies no licence. The test key is trusted only
//! with the crate feature `test-licence`, so no configuration of a release build can make
//! it accept a test licence.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

const PREFIX: &str = "km1.";

/// Public keys whose licences this build accepts, as given to the build. Several, so a
/// key can be rotated without refusing the licences already issued.
const PRODUCTION_KEYS: &str = match option_env!("KM_LICENCE_PUBLIC_KEYS") {
    Some(keys) => keys,
    None => "",
};

// A malformed key list stops the build rather than a licence later.
const _: () = assert!(
    keys_are_hex(PRODUCTION_KEYS),
    "KM_LICENCE_PUBLIC_KEYS: expected public keys of 64 hex digits, separated by spaces or commas"
);

/// Whether `list` is words of exactly 64 hex digits separated by spaces or commas.
const fn keys_are_hex(list: &str) -> bool {
    let bytes = list.as_bytes();
    let (mut i, mut run) = (0, 0);
    while i <= bytes.len() {
        let b = if i < bytes.len() { bytes[i] } else { b' ' };
        if b.is_ascii_hexdigit() {
            run += 1;
        } else if matches!(b, b' ' | b',' | b'\n' | b'\t') {
            if run != 0 && run != 64 {
                return false;
            }
            run = 0;
        } else {
            return false;
        }
        i += 1;
    }
    true
}

/// Public half of `tests/keys/test-licence.key`.
#[cfg(feature = "test-licence")]
const TEST_KEY: &str = "fe9319210c7f05f7de71b5d7629a0076fa657b252db3a38625e613056409c64e";

/// What an appliance without a licence does, said the same way by `km config check`, the
/// wizard, headless apply and `km licence show` (the dashboard says "unlicensed").
pub const UNLICENSED: &str =
    "not set: km runs unlicensed, every process is monitored and no limit applies";

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
    #[error(
        "this km was built without licence keys (KM_LICENCE_PUBLIC_KEYS at build time): it verifies no licence"
    )]
    NoKeys,
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
    verify_with(text, now_s, &trusted_keys()).map(|(licence, _)| licence)
}

/// As [`verify`], also naming the key that verified the licence.
pub fn verify_naming_key(text: &str, now_s: i64) -> Result<(Licence, TrustedKey), LicenceError> {
    let keys = trusted_keys();
    verify_with(text, now_s, &keys).map(|(licence, i)| (licence, keys[i].clone()))
}

/// Whether this build trusts the test key (built with the feature `test-licence`).
pub const TEST_KEY_TRUSTED: bool = cfg!(feature = "test-licence");

/// A public key this build trusts, and where it comes from.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    pub key: VerifyingKey,
    /// `production key N` (in build order) or `the test key`.
    pub name: String,
}

impl fmt::Display for TrustedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, hex::encode(self.key.as_bytes()))
    }
}

/// The keys compiled in. One that is not a point of the curve is reported by
/// [`invalid_production_keys`] and trusted by nothing.
pub fn trusted_keys() -> Vec<TrustedKey> {
    let production = production_key_texts()
        .enumerate()
        .filter_map(|(i, hex_key)| {
            Some(TrustedKey {
                key: verifying_key(hex_key)?,
                name: format!("production key {}", i + 1),
            })
        });
    #[cfg(feature = "test-licence")]
    let test = verifying_key(TEST_KEY).map(|key| TrustedKey {
        key,
        name: "the test key".into(),
    });
    #[cfg(not(feature = "test-licence"))]
    let test = None;
    production.chain(test).collect()
}

fn production_key_texts() -> impl Iterator<Item = &'static str> {
    PRODUCTION_KEYS
        .split([' ', ',', '\n', '\t'])
        .filter(|k| !k.is_empty())
}

/// Production keys given to the build that are not Ed25519 public keys.
pub fn invalid_production_keys() -> Vec<&'static str> {
    production_key_texts()
        .filter(|k| verifying_key(k).is_none())
        .collect()
}

fn verifying_key(hex_key: &str) -> Option<VerifyingKey> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_key, &mut bytes).ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// A new signing key: the key file's text (secret, with its public half in a comment)
/// and the public half in hex.
pub fn keygen(now_s: i64) -> (String, String) {
    let key = SigningKey::from_bytes(&rand::random());
    let public = hex::encode(key.verifying_key().as_bytes());
    let file = format!(
        "# KM licence signing key, made {}. Keep it secret: whoever holds it issues licences.\n\
         # Public half (KM_LICENCE_PUBLIC_KEYS when building km): {public}\n{}\n",
        date(now_s),
        hex::encode(key.to_bytes())
    );
    (file, public)
}

/// The licence and the index in `keys` of the key that verified it.
fn verify_with(
    text: &str,
    now_s: i64,
    keys: &[TrustedKey],
) -> Result<(Licence, usize), LicenceError> {
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
    if keys.is_empty() {
        return Err(LicenceError::NoKeys);
    }
    // Strict verification: no malleable signatures, no weak keys.
    let index = keys
        .iter()
        .position(|k| k.key.verify_strict(&payload, &signature).is_ok())
        .ok_or(LicenceError::BadSignature)?;
    let licence: Licence =
        serde_json::from_slice(&payload).map_err(|e| LicenceError::Contents(e.to_string()))?;
    if now_s >= licence.expires_at {
        return Err(LicenceError::Expired {
            expires_at: licence.expires_at,
        });
    }
    Ok((licence, index))
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

    fn trusting(key: &SigningKey) -> [TrustedKey; 1] {
        [TrustedKey {
            key: key.verifying_key(),
            name: "production key 1".into(),
        }]
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
        let (got, index) = verify_with(&format!(" {text}\n"), NOW, &trusting(&key)).unwrap();
        assert_eq!(index, 0);
        assert_eq!(got, licence(NOW + DAY));
        assert_eq!(got.max_processes(), Some(20));
    }

    #[test]
    fn expired_licence_names_the_day() {
        let key = random_key();
        let expires_at = 1_769_817_600; // 2026-01-31T00:00:00Z
        let text = sign(&licence(expires_at), &key);
        let err = verify_with(&text, expires_at, &trusting(&key)).unwrap_err();
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
        let err = verify_with(&forged, NOW, &trusting(&key)).unwrap_err();
        assert_eq!(err, LicenceError::BadSignature);
        assert!(
            err.to_string()
                .contains("altered or not issued for this product")
        );
    }

    #[test]
    fn wrong_key_is_refused() {
        let text = sign(&licence(NOW + DAY), &random_key());
        assert_eq!(
            verify_with(&text, NOW, &trusting(&random_key())),
            Err(LicenceError::BadSignature)
        );
        assert_eq!(
            verify_with(&text, NOW, &[]),
            Err(LicenceError::NoKeys),
            "a build without keys says so"
        );
        assert!(matches!(
            verify(&text, NOW),
            Err(LicenceError::BadSignature | LicenceError::NoKeys)
        ));
    }

    #[test]
    fn malformed_licences_say_why() {
        let keys = trusting(&random_key());
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
        let err = verify_with(&text, NOW, &trusting(&key)).unwrap_err();
        assert!(
            matches!(err, LicenceError::Contents(ref e) if e.contains("seats")),
            "{err}"
        );
    }

    #[test]
    fn compiled_keys_are_valid_and_the_test_key_file_is_not_production() {
        assert_eq!(invalid_production_keys(), Vec::<&str>::new());
        let test_public = hex::encode(test_key().verifying_key().as_bytes());
        assert!(production_key_texts().all(|k| !k.eq_ignore_ascii_case(&test_public)));
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

    #[test]
    fn key_lists_given_to_the_build() {
        let key = "ab".repeat(32);
        assert!(keys_are_hex(""));
        assert!(keys_are_hex(&key));
        assert!(keys_are_hex(&format!(" {key}, {key}\n")));
        assert!(!keys_are_hex(&key[1..]));
        assert!(!keys_are_hex(&format!("{key}0")));
        assert!(!keys_are_hex(&format!("{key};{key}")));
    }

    #[test]
    fn keygen_makes_a_key_file_sign_reads_and_its_public_half() {
        let (file, public) = keygen(NOW);
        assert!(file.contains(&public), "{file}");
        let key = parse_signing_key(&file).unwrap();
        assert_eq!(hex::encode(key.verifying_key().as_bytes()), public);
        let text = sign(&licence(NOW + DAY), &key);
        let trusted = [TrustedKey {
            key: verifying_key(&public).unwrap(),
            name: "production key 1".into(),
        }];
        assert_eq!(
            verify_with(&text, NOW, &trusted),
            Ok((licence(NOW + DAY), 0))
        );
        assert_ne!(keygen(NOW).1, public, "every key is new");
    }

    #[cfg(not(feature = "test-licence"))]
    #[test]
    fn test_key_refused_without_the_feature() {
        const { assert!(!TEST_KEY_TRUSTED) };
        let text = sign(&licence(NOW + DAY), &test_key());
        assert!(matches!(
            verify(&text, NOW),
            Err(LicenceError::BadSignature | LicenceError::NoKeys)
        ));
    }

    #[cfg(feature = "test-licence")]
    #[test]
    fn test_key_accepted_with_the_feature() {
        const { assert!(TEST_KEY_TRUSTED) };
        let text = sign(&licence(NOW + DAY), &test_key());
        assert_eq!(verify(&text, NOW), Ok(licence(NOW + DAY)));
        let (_, key) = verify_naming_key(&text, NOW).unwrap();
        assert_eq!(key.name, "the test key");
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
