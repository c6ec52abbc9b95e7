//! The one-time setup token: the only key to the wizard. It is written root-only in the
//! state dir (so the operator can read it again from a root shell), expires, is compared
//! in constant time, and stops working once the wizard locks itself after an apply.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use km_stores::bus::Counters;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// How long a token opens the wizard.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Wrong tokens allowed per address before it must wait.
const MAX_FAILURES: u64 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(600);

#[derive(Serialize, Deserialize)]
struct TokenFile {
    token: String,
    expires_at: u64,
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wizard's state dir: the token file and the lock.
#[derive(Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Why a request was refused (never shown to the requester: they get a bare 403).
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Locked,
    NoToken,
    Wrong,
    Expired,
}

impl StateDir {
    /// Opens (creating, mode 0700) the state dir.
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn token_path(&self) -> PathBuf {
        self.dir.join("setup-token")
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join("locked")
    }

    /// Written with the first lock and never removed: settings were applied once.
    fn applied_path(&self) -> PathBuf {
        self.dir.join("applied")
    }

    pub fn is_locked(&self) -> bool {
        self.lock_path().exists()
    }

    /// Whether an apply ever succeeded here (the page then changes settings instead of
    /// setting the appliance up, and asks for no first admin). The env file alone cannot
    /// tell: the image ships one with the listen addresses and data dir.
    pub fn was_applied(&self) -> bool {
        self.applied_path().exists()
    }

    /// A new token (replacing any other), written 0600; the wizard is unlocked.
    pub fn issue(&self) -> std::io::Result<String> {
        let token = random_hex(24);
        let file = TokenFile {
            token: token.clone(),
            expires_at: now_s() + TOKEN_LIFETIME.as_secs(),
        };
        let tmp = self.dir.join(".setup-token.tmp");
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        out.write_all(&serde_json::to_vec(&file).map_err(std::io::Error::other)?)?;
        out.sync_all()?;
        fs::rename(&tmp, self.token_path())?;
        match fs::remove_file(self.lock_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(token)
    }

    /// The current token, if one was issued and the wizard is open (for `serve`, which
    /// prints the URL again on restart instead of issuing a new token).
    pub fn current(&self) -> Option<String> {
        let file = self.read()?;
        (file.expires_at > now_s() && !self.is_locked()).then_some(file.token)
    }

    fn read(&self) -> Option<TokenFile> {
        serde_json::from_slice(&fs::read(self.token_path()).ok()?).ok()
    }

    /// Locks the wizard: the token is removed and every route answers 403 until
    /// `km-wizard reopen`.
    pub fn lock(&self) -> std::io::Result<()> {
        fs::write(self.applied_path(), now_s().to_string())?;
        fs::write(self.lock_path(), now_s().to_string())?;
        match fs::remove_file(self.token_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether `given` opens the wizard now.
    pub fn check(&self, given: Option<&str>) -> Result<(), Refusal> {
        if self.is_locked() {
            return Err(Refusal::Locked);
        }
        let given = given.filter(|g| !g.is_empty()).ok_or(Refusal::NoToken)?;
        let file = self.read().ok_or(Refusal::Wrong)?;
        if !bool::from(file.token.as_bytes().ct_eq(given.as_bytes())) {
            return Err(Refusal::Wrong);
        }
        if file.expires_at <= now_s() {
            return Err(Refusal::Expired);
        }
        Ok(())
    }
}

/// Wrong-token attempts per address: after too many in a window, even the right token
/// waits until the window ends.
#[derive(Default)]
pub struct Attempts {
    counters: Counters,
}

impl Attempts {
    pub fn blocked(&self, ip: IpAddr) -> bool {
        self.counters
            .get(&ip.to_string(), Instant::now())
            .is_some_and(|(n, _)| n >= MAX_FAILURES)
    }

    pub fn failed(&self, ip: IpAddr) {
        self.counters
            .hit(&ip.to_string(), FAILURE_WINDOW, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_until_locked_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("state")).unwrap();
        assert_eq!(state.check(Some("x")), Err(Refusal::Wrong));
        let token = state.issue().unwrap();
        let mode = fs::metadata(state.token_path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(state.check(Some(&token)), Ok(()));
        assert_eq!(state.check(None), Err(Refusal::NoToken));
        assert_eq!(state.check(Some(&token[1..])), Err(Refusal::Wrong));
        assert_eq!(state.current().as_deref(), Some(token.as_str()));
        assert!(!state.was_applied());
        state.lock().unwrap();
        assert!(state.was_applied());
        assert_eq!(state.check(Some(&token)), Err(Refusal::Locked));
        assert_eq!(state.current(), None);
        let fresh = state.issue().unwrap();
        assert_ne!(fresh, token);
        assert_eq!(state.check(Some(&token)), Err(Refusal::Wrong));
        assert_eq!(state.check(Some(&fresh)), Ok(()));
        assert!(
            state.was_applied(),
            "reopening does not make it a first boot again"
        );
    }

    #[test]
    fn expired_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        let file = TokenFile {
            token: "abc".into(),
            expires_at: now_s() - 1,
        };
        fs::write(state.token_path(), serde_json::to_vec(&file).unwrap()).unwrap();
        assert_eq!(state.check(Some("abc")), Err(Refusal::Expired));
    }

    #[test]
    fn repeated_failures_block_an_address() {
        let attempts = Attempts::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(!attempts.blocked(ip));
            attempts.failed(ip);
        }
        assert!(attempts.blocked(ip));
        assert!(!attempts.blocked("10.0.0.2".parse().unwrap()));
    }
}
