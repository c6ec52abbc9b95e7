//! Failed attempts counted per key (an account, a client address) in fixed windows: after
//! too many within one, every attempt of that key waits until the window ends, the right
//! one too. Sign-ins count through the bus, so that every role and node shares the count;
//! [`Counters`] hold them in memory (the in-process bus, the setup wizard).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::stores::Bus;

/// Keys counted at once in memory; beyond it (after forgetting the ended windows) a new
/// key is not counted, so a flood of made-up names cannot exhaust memory.
const MAX_KEYS: usize = 100_000;

/// Failure counters in memory: per key, the failures of its window and when it ends.
#[derive(Default)]
pub struct Counters {
    windows: Mutex<HashMap<String, (u64, Instant)>>,
}

impl Counters {
    /// Counts a failure of `key`, opening a window of `window` if none is open; returns
    /// the failures of the window.
    pub fn hit(&self, key: &str, window: Duration, now: Instant) -> u64 {
        let mut windows = self.windows.lock();
        if windows.len() >= MAX_KEYS && !windows.contains_key(key) {
            windows.retain(|_, (_, ends)| *ends > now);
            if windows.len() >= MAX_KEYS {
                return 0;
            }
        }
        let entry = windows.entry(key.to_string()).or_insert((0, now + window));
        if entry.1 <= now {
            *entry = (0, now + window);
        }
        entry.0 += 1;
        entry.0
    }

    /// The failures of `key`'s open window and the time left in it.
    pub fn get(&self, key: &str, now: Instant) -> Option<(u64, Duration)> {
        let windows = self.windows.lock();
        let (count, ends) = windows.get(key)?;
        (*ends > now).then(|| (*count, *ends - now))
    }

    pub fn forget(&self, key: &str) {
        self.windows.lock().remove(key);
    }
}

/// Failed sign-ins allowed per account within [`SIGN_IN_WINDOW`].
pub const ACCOUNT_FAILURES: u64 = 5;
/// Failed sign-ins allowed per client address within [`SIGN_IN_WINDOW`].
pub const ADDRESS_FAILURES: u64 = 20;
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(15 * 60);

fn account_key(account: &str) -> String {
    format!("signin:account:{account}")
}

fn address_key(ip: IpAddr) -> String {
    format!("signin:ip:{ip}")
}

/// How long a sign-in as `account` (its id, or the name given) from `ip` must wait, if it
/// must. A bus that does not answer holds no one back (and is logged).
pub async fn sign_in_wait(bus: &dyn Bus, account: &str, ip: Option<IpAddr>) -> Option<Duration> {
    let mut checks = vec![(account_key(account), ACCOUNT_FAILURES)];
    checks.extend(ip.map(|ip| (address_key(ip), ADDRESS_FAILURES)));
    let mut wait = None;
    for (key, max) in checks {
        match bus.failures(&key).await {
            Ok(Some((count, left))) if count >= max => wait = wait.max(Some(left)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sign-in throttle: failures not read"),
        }
    }
    wait
}

/// Records a sign-in's outcome: a failure counts against the account and the address, a
/// success clears the account's count.
pub async fn record_sign_in(bus: &dyn Bus, account: &str, ip: Option<IpAddr>, success: bool) {
    let recorded = if success {
        bus.forget_failures(&account_key(account)).await
    } else {
        let counted = bus
            .count_failure(&account_key(account), SIGN_IN_WINDOW)
            .await;
        match ip {
            Some(ip) => counted.and(bus.count_failure(&address_key(ip), SIGN_IN_WINDOW).await),
            None => counted,
        }
        .map(|_| ())
    };
    if let Err(e) = recorded {
        tracing::warn!(error = %e, "sign-in throttle: outcome not recorded");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_until_they_end() {
        let counters = Counters::default();
        let start = Instant::now();
        let minute = Duration::from_secs(60);
        assert_eq!(counters.hit("a", minute, start), 1);
        assert_eq!(
            counters.hit("a", minute, start + Duration::from_secs(10)),
            2
        );
        assert_eq!(
            counters.get("a", start + Duration::from_secs(20)),
            Some((2, Duration::from_secs(40)))
        );
        assert_eq!(counters.get("b", start), None);
        assert_eq!(counters.get("a", start + minute), None, "the window ended");
        assert_eq!(counters.hit("a", minute, start + minute), 1, "a new window");
        counters.forget("a");
        assert_eq!(counters.get("a", start), None);
    }
}
