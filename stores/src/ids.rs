//! Identifiers and time: 24-hex ObjectIds (the official client matches bucket ids with
//! `/[0-9a-fA-F]{24}/`), random keys, epoch milliseconds.

use rand::RngCore;

/// A new ObjectId as 24 lowercase hex characters.
pub fn new_object_id() -> String {
    bson::oid::ObjectId::new().to_hex()
}

/// Whether `s` looks like an ObjectId (24 hex characters).
pub fn is_object_id(s: &str) -> bool {
    s.len() == 24 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `bytes` random bytes from the OS-seeded generator, hex encoded.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of an epoch ms.
pub fn utc_text(ms: i64) -> String {
    let rfc3339 = bson::DateTime::from_millis(ms)
        .try_to_rfc3339_string()
        .unwrap_or_default();
    rfc3339.get(..19).unwrap_or_default().replace('T', " ")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_ids_are_24_hex_and_unique() {
        let (a, b) = (new_object_id(), new_object_id());
        assert!(is_object_id(&a) && is_object_id(&b));
        assert_ne!(a, b);
        assert!(!is_object_id("zz5f1c2e3d4b5a6978695a4b"));
        assert_eq!(random_hex(16).len(), 32);
    }
}
