//! Failed attempts counted per key in fixed windows, in memory: the in-process bus and the
//! setup wizard (sign-ins across nodes count through the Redis bus).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

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
