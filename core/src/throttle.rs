//! Failed attempts counted per key (an account, a client address) in fixed windows: after
//! too many within one, every attempt of that key waits until the window ends, the right
//! one too. Sign-ins and password resets count through the bus, so that every role and
//! node shares the count.

use std::net::IpAddr;
use std::time::Duration;

use km_stores::Bus;

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
    held(bus, &checks).await
}

/// The longest wait of the `(key, most allowed)` that are at their most.
async fn held(bus: &dyn Bus, checks: &[(String, u64)]) -> Option<Duration> {
    let mut wait = None;
    for (key, max) in checks {
        match bus.failures(key).await {
            Ok(Some((count, left))) if count >= *max => wait = wait.max(Some(left)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, key, "throttle: count not read"),
        }
    }
    wait
}

/// Reset mails one account may be sent within [`RESET_WINDOW`] when people ask for them
/// (each is a mail anyone can make the account's owner receive).
pub const RESET_MAILS: u64 = 3;
/// Resets one client address may ask for within [`RESET_WINDOW`].
pub const RESET_ASKS: u64 = 10;
pub const RESET_WINDOW: Duration = Duration::from_secs(3600);

/// Counts a password reset asked for `account` from `ip`: false (nothing counted) when
/// either is at its most, and no mail should go.
pub async fn reset_allowed(bus: &dyn Bus, account: &str, ip: Option<IpAddr>) -> bool {
    let mut checks = vec![(format!("reset:account:{account}"), RESET_MAILS)];
    checks.extend(ip.map(|ip| (format!("reset:ip:{ip}"), RESET_ASKS)));
    if held(bus, &checks).await.is_some() {
        return false;
    }
    for (key, _) in &checks {
        if let Err(e) = bus.count_failure(key, RESET_WINDOW).await {
            tracing::warn!(error = %e, key, "throttle: reset not counted");
        }
    }
    true
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
