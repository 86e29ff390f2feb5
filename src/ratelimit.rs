//! Token buckets: the one implementation of "so many per second on average, so many at once".
//!
//! Three limits use it: frames per WebSocket connection (`ws_frames_per_sec`, a [`Bucket`] the
//! session owns), PUTs per registration (`put_rate_per_sec`, [`Buckets`] keyed by endpoint
//! token and shared by every request on the node) and new UAIDs per client address
//! (`uaid_rate_per_sec`, [`Buckets`] keyed by IP address). Keyed buckets are created on first use and
//! dropped by [`Buckets::prune`] once full again, since a full bucket limits nothing: memory
//! follows the registrations PUT to within the last refill time, not every one ever seen.
//! Time is passed in, so the arithmetic is tested without a clock.

use std::hash::Hash;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// The shape of a limit: `per_sec` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_sec: f64,
    burst: f64,
}

impl Rate {
    /// A burst of 0 is taken as 1, so that a bucket can ever allow anything.
    pub fn new(per_sec: u32, burst: u32) -> Rate {
        Rate {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
        }
    }

    /// One per `interval`, no burst: a debounce (the KICK scheduler's `min_interval_secs`).
    pub fn every(interval: Duration) -> Rate {
        Rate {
            per_sec: 1.0 / interval.as_secs_f64(),
            burst: 1.0,
        }
    }

    /// Time for an empty bucket to fill up again (`Duration::MAX` when it never refills).
    pub fn refill_time(&self) -> Duration {
        Duration::try_from_secs_f64(self.burst / self.per_sec).unwrap_or(Duration::MAX)
    }
}

/// The state of one bucket. 24 bytes, no allocation.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A bucket that allows a whole burst.
    pub fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: rate.burst,
            last: now,
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.take_n(rate, 1, now)
    }

    /// Takes `n` tokens at once, or none and says how long until `n` are available (never, as
    /// `Duration::MAX`, when `n` exceeds the burst).
    pub fn take_n(&mut self, rate: Rate, n: u32, now: Instant) -> Result<(), Duration> {
        self.tokens = self.tokens_at(rate, now);
        // Callers on several threads may hand in instants slightly out of order: never go back,
        // or the next call would count the same time twice.
        self.last = self.last.max(now);
        let n = f64::from(n);
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else if n > rate.burst {
            Err(Duration::MAX)
        } else {
            let wait = (n - self.tokens) / rate.per_sec;
            Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
        }
    }

    /// Whether the bucket has refilled by `now`, so that forgetting it changes nothing.
    pub fn is_full(&self, rate: Rate, now: Instant) -> bool {
        self.tokens_at(rate, now) >= rate.burst
    }

    fn tokens_at(&self, rate: Rate, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * rate.per_sec).min(rate.burst)
    }
}

/// One bucket per key, shared across tasks. A `DashMap` so that concurrent requests for
/// different keys rarely share a lock, and a take is one shard lock and no allocation.
pub struct Buckets<K> {
    rate: Rate,
    map: DashMap<K, Bucket>,
}

impl<K: Eq + Hash> Buckets<K> {
    pub fn new(rate: Rate) -> Buckets<K> {
        Buckets {
            rate,
            map: DashMap::new(),
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one token from `key`'s bucket (a new key starts full), or says how long until one
    /// is available.
    pub fn take(&self, key: K, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        self.map
            .entry(key)
            .or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    /// Takes `n` tokens at once from `key`'s bucket (see [`Bucket::take_n`]).
    pub fn take_n(&self, key: K, n: u32, now: Instant) -> Result<(), Duration> {
        let rate = self.rate;
        self.map
            .entry(key)
            .or_insert_with(|| Bucket::full(rate, now))
            .take_n(rate, n, now)
    }

    /// Forgets every bucket that is full again; returns how many were dropped.
    pub fn prune(&self, now: Instant) -> usize {
        let before = self.map.len();
        self.map.retain(|_, bucket| !bucket.is_full(self.rate, now));
        before.saturating_sub(self.map.len())
    }

    /// Buckets held now (for metrics).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A wait as whole seconds for `Retry-After`: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs();
    let up = if wait.subsec_nanos() > 0 {
        secs.saturating_add(1)
    } else {
        secs
    };
    up.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The wait a refused take reports, to the microsecond (it is floating-point arithmetic).
    fn wait_us(result: Result<(), Duration>) -> u128 {
        (result.expect_err("refused").as_nanos() + 500) / 1000
    }

    #[test]
    fn a_bucket_allows_a_burst_then_the_average() {
        let start = Instant::now();
        let rate = Rate::new(10, 5);
        let mut b = Bucket::full(rate, start);
        assert!((0..5).all(|_| b.take(rate, start).is_ok()));
        // Empty: one token comes back every 100 ms.
        assert_eq!(wait_us(b.take(rate, start)), 100_000);
        assert_eq!(wait_us(b.take(rate, start + 40 * MS)), 60_000);
        assert!(b.take(rate, start + 100 * MS).is_ok());
        assert!(b.take(rate, start + 100 * MS).is_err());
        // Idle for long: refills to the burst, never beyond.
        let later = start + Duration::from_secs(60);
        assert!(b.is_full(rate, later));
        assert!((0..5).all(|_| b.take(rate, later).is_ok()));
        assert!(b.take(rate, later).is_err());
    }

    #[test]
    fn instants_out_of_order_do_not_mint_tokens() {
        let start = Instant::now();
        let rate = Rate::new(1, 1);
        let mut b = Bucket::full(rate, start);
        assert!(b.take(rate, start + 1000 * MS).is_ok());
        // An earlier instant from another thread: no time passed, no token.
        assert!(b.take(rate, start + 500 * MS).is_err());
        assert!(b.take(rate, start + 1500 * MS).is_err());
        assert!(b.take(rate, start + 2000 * MS).is_ok());
    }

    #[test]
    fn a_burst_of_zero_still_allows_one() {
        let start = Instant::now();
        let rate = Rate::new(1, 0);
        let mut b = Bucket::full(rate, start);
        assert!(b.take(rate, start).is_ok());
        assert!(b.take(rate, start).is_err());
        assert_eq!(rate.refill_time(), Duration::from_secs(1));
        assert_eq!(Rate::new(0, 5).refill_time(), Duration::MAX);
    }

    #[test]
    fn keyed_buckets_are_independent_and_pruned_once_full() {
        let start = Instant::now();
        let buckets: Buckets<u8> = Buckets::new(Rate::new(2, 3));
        assert!((0..3).all(|_| buckets.take(1, start).is_ok()));
        assert_eq!(wait_us(buckets.take(1, start)), 500_000);
        assert!(buckets.take(2, start).is_ok());
        assert_eq!(buckets.len(), 2);
        // Key 2 took one token: full again after 500 ms; key 1 (empty) after 1.5 s.
        assert_eq!(buckets.prune(start + 499 * MS), 0);
        assert_eq!(buckets.prune(start + 500 * MS), 1);
        assert_eq!(buckets.len(), 1);
        assert!(buckets.take(1, start + 500 * MS).is_ok());
        assert_eq!(buckets.prune(start + 1999 * MS), 0);
        assert_eq!(buckets.prune(start + 2000 * MS), 1);
        assert!(buckets.is_empty());
        assert_eq!(buckets.rate().refill_time(), 1500 * MS);
    }

    #[test]
    fn take_n_takes_all_or_nothing() {
        let start = Instant::now();
        let rate = Rate::new(10, 5);
        let mut b = Bucket::full(rate, start);
        assert!(b.take_n(rate, 3, start).is_ok());
        // Two left: four are refused whole, and the wait is for the two missing.
        assert_eq!(wait_us(b.take_n(rate, 4, start)), 200_000);
        assert!(b.take_n(rate, 2, start).is_ok());
        assert_eq!(
            b.take_n(rate, 6, start + Duration::from_secs(60)),
            Err(Duration::MAX)
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(MS), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(1001 * MS), 2);
        assert_eq!(retry_after_secs(Duration::MAX), u64::MAX);
    }
}
