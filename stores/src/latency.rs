//! Latency histograms: how a store keeps a route's requests per minute so that its
//! percentiles cost a read of its minutes, not of its spans.
//!
//! Durations fall in log-scale buckets, [`PER_DOUBLING`] to each doubling (bucket `i`
//! holds `[2^(i/64), 2^((i+1)/64))` µs), so a percentile read back as its bucket's middle
//! is within 0.55 % of the exact one; the smallest and largest durations are kept as they
//! are (a single request reads back exactly). Only the buckets used are kept.

use std::collections::BTreeMap;

/// Buckets per doubling of the duration.
const PER_DOUBLING: f64 = 64.0;
/// Bytes of one bucket in [`Latencies::encode`]: its index (u16) and count (u32).
const BUCKET_BYTES: usize = 6;

/// The durations of a set of requests (µs).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latencies {
    pub count: u64,
    pub min_us: i64,
    pub max_us: i64,
    /// Requests by bucket index.
    buckets: BTreeMap<u16, u64>,
}

/// The bucket of a duration (all under 2 µs in the first).
fn bucket_of(us: i64) -> u16 {
    if us < 2 {
        return 0;
    }
    // At most 64 × 63 = 4,032: within u16.
    ((us as f64).log2() * PER_DOUBLING).floor() as u16
}

/// The middle of a bucket (geometric), µs.
fn middle_of(bucket: u16) -> f64 {
    ((f64::from(bucket) + 0.5) / PER_DOUBLING).exp2()
}

impl Latencies {
    /// One request of `us` (negative durations count as 0).
    pub fn add(&mut self, us: i64) {
        let us = us.max(0);
        if self.count == 0 {
            (self.min_us, self.max_us) = (us, us);
        }
        self.min_us = self.min_us.min(us);
        self.max_us = self.max_us.max(us);
        self.count += 1;
        *self.buckets.entry(bucket_of(us)).or_default() += 1;
    }

    /// Adds `other`'s requests to these.
    pub fn merge(&mut self, other: &Latencies) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            (self.min_us, self.max_us) = (other.min_us, other.max_us);
        }
        self.min_us = self.min_us.min(other.min_us);
        self.max_us = self.max_us.max(other.max_us);
        self.count += other.count;
        for (bucket, n) in &other.buckets {
            *self.buckets.entry(*bucket).or_default() += n;
        }
    }

    /// The `p`-th percentile (nearest rank), µs; 0 with no request.
    pub fn percentile(&self, p: u32) -> i64 {
        let rank = (self.count * u64::from(p)).div_ceil(100).max(1);
        let mut seen = 0;
        for (bucket, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                let middle = middle_of(*bucket).round() as i64;
                return middle.clamp(self.min_us, self.max_us);
            }
        }
        self.max_us
    }

    /// The buckets as bytes (index and count, little-endian, in index order).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.buckets.len() * BUCKET_BYTES);
        for (bucket, n) in &self.buckets {
            bytes.extend(bucket.to_le_bytes());
            bytes.extend(u32::try_from(*n).unwrap_or(u32::MAX).to_le_bytes());
        }
        bytes
    }

    /// Latencies from their count, extremes and [`Latencies::encode`]d buckets (a
    /// truncated tail is left out).
    pub fn decode(count: u64, min_us: i64, max_us: i64, bytes: &[u8]) -> Latencies {
        let buckets = bytes
            .chunks_exact(BUCKET_BYTES)
            .map(|b| {
                let bucket = u16::from_le_bytes([b[0], b[1]]);
                let n = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                (bucket, u64::from(n))
            })
            .fold(
                BTreeMap::new(),
                |mut all: BTreeMap<u16, u64>, (bucket, n)| {
                    *all.entry(bucket).or_default() += n;
                    all
                },
            );
        Latencies {
            count,
            min_us,
            max_us,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_within_their_bucket() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.add(ms * 1000);
        }
        for (p, exact) in [(50, 50_000), (95, 95_000), (99, 99_000)] {
            let got = l.percentile(p);
            assert!((got - exact).abs() * 1000 <= exact * 6, "p{p}: {got}");
        }
        assert_eq!(
            (l.percentile(100), l.min_us, l.max_us),
            (100_000, 1000, 100_000)
        );
        let mut one = Latencies::default();
        one.add(123_456);
        assert_eq!(
            one.percentile(50),
            123_456,
            "a single request reads back exactly"
        );
        assert_eq!(Latencies::default().percentile(99), 0);
    }

    #[test]
    fn merged_minutes_are_the_whole() {
        let (mut a, mut b, mut whole) = Default::default();
        for us in [5, 900, 1_000_000, 3, 0, -7] {
            Latencies::add(&mut a, us);
            Latencies::add(&mut whole, us);
        }
        for us in [40_000, 41_000, i64::MAX] {
            Latencies::add(&mut b, us);
            Latencies::add(&mut whole, us);
        }
        let mut merged = Latencies::default();
        merged.merge(&a);
        merged.merge(&Latencies::default());
        merged.merge(&b);
        assert_eq!(merged, whole);
        assert_eq!(merged.min_us, 0);
    }

    #[test]
    fn bytes_round_trip_and_garbage_is_harmless() {
        let mut l = Latencies::default();
        for us in [1, 2, 3, 1_000, 1_000, 86_400_000_000] {
            l.add(us);
        }
        let back = Latencies::decode(l.count, l.min_us, l.max_us, &l.encode());
        assert_eq!(back, l);
        let mut bytes = l.encode();
        bytes.push(7);
        assert_eq!(Latencies::decode(l.count, l.min_us, l.max_us, &bytes), l);
        let junk = Latencies::decode(3, 0, 9, &[0xff; 13]);
        assert_eq!(junk.percentile(50), 9, "clamped to the extremes");
    }
}
