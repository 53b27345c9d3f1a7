//! A rate limiter: a token bucket per key (a client address, a publisher),
//! `rate` tokens a second and at most `burst` saved up.
//!
//! Each bucket is stored as a single instant (GCRA, the "virtual
//! scheduling" form of a token bucket): the time at which it will be full
//! again. A bucket that is full is indistinguishable from one never seen, so
//! such entries are dropped by a sweep; the table never holds more than
//! [`MAX_KEYS`] entries. When it is full of buckets still refilling, new keys
//! pass unlimited until a sweep makes room: a flood of distinct addresses is
//! then bounded by `--max-connections`, not by this table's memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most keys tracked at once (about 3 MiB for IPv6 keys).
pub const MAX_KEYS: usize = 65_536;

/// How often buckets that have filled up are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often a full table may be swept to make room.
const FULL_SWEEP_EVERY: Duration = Duration::from_secs(1);

pub struct RateLimiter<K> {
    /// Time one token takes to come back, in nanoseconds.
    interval: u64,
    /// How far ahead of now a bucket's "full again" time may run.
    tolerance: u64,
    start: Instant,
    table: Mutex<Table<K>>,
}

struct Table<K> {
    /// Per key: when its bucket is full again (ns since `start`).
    full_at: HashMap<K, u64>,
    last_sweep: u64,
}

impl<K> std::fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("interval_ns", &self.interval)
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// `rate` tokens a second, `burst` at most; `None` when `rate` is 0
    /// (no limit).
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        let interval = 1_000_000_000 / u64::from(rate);
        Some(RateLimiter {
            interval,
            tolerance: interval * u64::from(burst.max(1) - 1),
            start: Instant::now(),
            table: Mutex::new(Table {
                full_at: HashMap::new(),
                last_sweep: 0,
            }),
        })
    }

    /// Takes a token for `key`, or says how long until one is available.
    pub fn check(&self, key: K) -> Result<(), Duration> {
        self.check_at(key, self.start.elapsed().as_nanos() as u64)
    }

    fn check_at(&self, key: K, now: u64) -> Result<(), Duration> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if now.saturating_sub(t.last_sweep) >= SWEEP_EVERY.as_nanos() as u64 {
            t.sweep(now);
        }
        let known = t.full_at.get(&key).copied();
        let at = known.unwrap_or(now).max(now);
        if at - now > self.tolerance {
            return Err(Duration::from_nanos(at - self.tolerance - now));
        }
        if known.is_none() && t.full_at.len() >= MAX_KEYS {
            if now.saturating_sub(t.last_sweep) >= FULL_SWEEP_EVERY.as_nanos() as u64 {
                t.sweep(now);
            }
            if t.full_at.len() >= MAX_KEYS {
                return Ok(());
            }
        }
        t.full_at.insert(key, at + self.interval);
        Ok(())
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .full_at
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K> Table<K> {
    fn sweep(&mut self, now: u64) {
        self.full_at.retain(|_, at| *at > now);
        self.last_sweep = now;
    }
}

/// Whole seconds to put in `Retry-After` for a wait of `d` (at least 1).
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_nanos().div_ceil(1_000_000_000) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn allows_a_burst_then_the_rate() {
        let r = RateLimiter::new(2, 4).unwrap();
        for _ in 0..4 {
            assert!(r.check_at("a", 0).is_ok());
        }
        let wait = r.check_at("a", 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        // Other keys are unaffected.
        assert!(r.check_at("b", 0).is_ok());
        // Half a second later one token is back, and only one.
        assert!(r.check_at("a", S / 2).is_ok());
        assert!(r.check_at("a", S / 2).is_err());
        // After two idle seconds the bucket is full again.
        for _ in 0..4 {
            assert!(r.check_at("a", 3 * S).is_ok());
        }
        assert!(r.check_at("a", 3 * S).is_err());
        assert!(RateLimiter::<&str>::new(0, 10).is_none());
    }

    #[test]
    fn the_table_stays_bounded() {
        let r = RateLimiter::new(1, 1).unwrap();
        for k in 0..MAX_KEYS as u64 + 100 {
            assert!(r.check_at(k, 0).is_ok());
        }
        assert_eq!(r.len(), MAX_KEYS);
        // Refilled buckets are swept away.
        assert!(r.check_at(u64::MAX, 20 * S).is_ok());
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
