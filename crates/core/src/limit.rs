//! Bounded rate limiters: token buckets per key, and exponential backoff after failures.
//!
//! Both keep at most a configured number of keys. A key that finds the table full shares
//! one overflow bucket with every other such key, so a flood of fresh (spoofed) keys
//! costs no memory and cannot starve keys already tracked. Entries that have refilled
//! completely carry no information and are pruned.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A token-bucket rate: `burst` at once, refilled at `per_second`. `burst == 0` turns the
/// limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Largest burst.
    pub burst: u32,
    /// Sustained rate.
    pub per_second: f64,
}

impl Rate {
    /// `burst` at once, then `per_second`.
    pub const fn new(burst: u32, per_second: f64) -> Self {
        Rate { burst, per_second }
    }

    /// No limit.
    pub const OFF: Rate = Rate {
        burst: 0,
        per_second: 0.0,
    };

    fn is_off(&self) -> bool {
        self.burst == 0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * rate.per_second).min(rate.burst as f64);
        self.at = now;
    }

    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if rate.per_second > 0.0 {
            Err(Duration::from_secs_f64(
                ((1.0 - self.tokens) / rate.per_second).min(86_400.0),
            ))
        } else {
            Err(Duration::from_secs(86_400))
        }
    }
}

/// Token buckets per key, at most `max_keys` of them.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: Rate,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
    overflow: Option<Bucket>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter with this rate for each key, tracking at most `max_keys` keys.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Limiter {
            rate,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
            overflow: None,
        }
    }

    /// Takes one token for `key`; `Err(wait)` says how long until one is available.
    pub fn check(&mut self, now: Instant, key: &K) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        let full = Bucket {
            tokens: self.rate.burst as f64,
            at: now,
        };
        if let Some(b) = self.buckets.get_mut(key) {
            return b.take(self.rate, now);
        }
        if self.buckets.len() >= self.max_keys {
            self.prune(now);
        }
        if self.buckets.len() >= self.max_keys {
            return self.overflow.get_or_insert(full).take(self.rate, now);
        }
        let rate = self.rate;
        self.buckets
            .entry(key.clone())
            .or_insert(full)
            .take(rate, now)
    }

    /// Like [`Limiter::check`], but a key that finds the table full is let through
    /// untracked: for limits that only save work (answers to a few noisy sources), where
    /// a flood from too many sources to track must not silence everyone else.
    pub fn check_or_pass(&mut self, now: Instant, key: &K) -> Result<(), Duration> {
        if self.rate.is_off() {
            return Ok(());
        }
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.prune(now);
            if self.buckets.len() >= self.max_keys {
                return Ok(());
            }
        }
        self.check(now, key)
    }

    /// Forgets keys whose bucket is full again (they would behave like new keys).
    pub fn prune(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            b.refill(rate, now);
            b.tokens < rate.burst as f64
        });
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    until: Instant,
    last: Instant,
}

/// Exponential backoff after repeated failures (wrong passwords), per key.
///
/// The first `free` failures cost nothing; each further one doubles the wait, from 1 s to
/// `max`. A success, or `forget_after` without failures, clears the key.
#[derive(Debug)]
pub struct Backoff<K> {
    free: u32,
    max: Duration,
    forget_after: Duration,
    max_keys: usize,
    keys: HashMap<K, Failures>,
}

impl<K: Hash + Eq + Clone> Backoff<K> {
    /// A backoff table.
    pub fn new(free: u32, max: Duration, forget_after: Duration, max_keys: usize) -> Self {
        Backoff {
            free,
            max,
            forget_after,
            max_keys: max_keys.max(1),
            keys: HashMap::new(),
        }
    }

    /// `Err(wait)` while `key` must wait before its next attempt.
    pub fn check(&self, now: Instant, key: &K) -> Result<(), Duration> {
        match self.keys.get(key) {
            Some(f) if f.until > now => Err(f.until - now),
            _ => Ok(()),
        }
    }

    /// Records a failure for `key`.
    pub fn fail(&mut self, now: Instant, key: &K) {
        if !self.keys.contains_key(key) && self.keys.len() >= self.max_keys {
            self.prune(now);
            if self.keys.len() >= self.max_keys {
                // Full of recent failures: evict the one that waits least.
                if let Some(k) = self
                    .keys
                    .iter()
                    .min_by_key(|(_, f)| f.until)
                    .map(|(k, _)| k.clone())
                {
                    self.keys.remove(&k);
                }
            }
        }
        let f = self.keys.entry(key.clone()).or_insert(Failures {
            count: 0,
            until: now,
            last: now,
        });
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count > self.free {
            let exp = (f.count - self.free - 1).min(20);
            let wait = Duration::from_secs(1u64 << exp).min(self.max);
            f.until = now + wait;
        }
    }

    /// Clears `key` after a success.
    pub fn succeed(&mut self, key: &K) {
        self.keys.remove(key);
    }

    /// Forgets keys without a failure for `forget_after`.
    pub fn prune(&mut self, now: Instant) {
        let keep = self.forget_after;
        self.keys
            .retain(|_, f| f.until > now || now.saturating_duration_since(f.last) < keep);
    }

    /// Keys tracked.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The key a source address is limited under: the IPv4 address, or the IPv6 /64 (one
/// subscriber usually holds a whole /64).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => {
            let mut o = a.octets();
            o[8..].fill(0);
            IpAddr::V6(o.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Rate::new(3, 2.0), 10);
        for _ in 0..3 {
            assert!(l.check(t0, &1).is_ok());
        }
        let wait = l.check(t0, &1).unwrap_err();
        assert!(wait <= Duration::from_millis(500) && wait > Duration::from_millis(400));
        assert!(l.check(t0, &2).is_ok(), "keys are independent");
        assert!(l.check(t0 + Duration::from_millis(500), &1).is_ok());
        assert!(l.check(t0 + Duration::from_millis(500), &1).is_err());
    }

    #[test]
    fn a_full_table_sends_new_keys_to_one_shared_bucket() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Rate::new(2, 0.001), 4);
        for k in 0..4 {
            assert!(l.check(t0, &k).is_ok());
        }
        assert_eq!(l.len(), 4);
        // A flood of fresh keys: two get through (the overflow bucket's burst), no more,
        // and the table does not grow.
        let passed = (100..10_000).filter(|k| l.check(t0, k).is_ok()).count();
        assert_eq!(passed, 2);
        assert_eq!(l.len(), 4);
        // Tracked keys keep their own budget.
        assert!(l.check(t0, &0).is_ok());
    }

    #[test]
    fn check_or_pass_lets_untracked_keys_through_when_full() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Rate::new(1, 0.001), 2);
        assert!(l.check_or_pass(t0, &1).is_ok());
        assert!(l.check_or_pass(t0, &1).is_err());
        assert!(l.check_or_pass(t0, &2).is_ok());
        assert!((3..100).all(|k| l.check_or_pass(t0, &k).is_ok()));
        assert_eq!(l.len(), 2);
        assert!(
            l.check_or_pass(t0, &1).is_err(),
            "tracked keys stay limited"
        );
    }

    #[test]
    fn refilled_keys_are_pruned() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Rate::new(2, 1.0), 100);
        for k in 0..50 {
            let _ = l.check(t0, &k);
        }
        assert_eq!(l.len(), 50);
        l.prune(t0 + Duration::from_secs(2));
        assert!(l.is_empty());
    }

    #[test]
    fn off_never_limits() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Rate::OFF, 1);
        assert!((0..1000).all(|k| l.check(t0, &k).is_ok()));
        assert!(l.is_empty());
    }

    #[test]
    fn backoff_doubles_after_the_free_failures_and_clears_on_success() {
        let t0 = Instant::now();
        let mut b = Backoff::new(3, Duration::from_secs(60), Duration::from_secs(3600), 10);
        for _ in 0..3 {
            assert!(b.check(t0, &"alice").is_ok());
            b.fail(t0, &"alice");
        }
        assert!(b.check(t0, &"alice").is_ok(), "three free failures");
        b.fail(t0, &"alice");
        assert_eq!(b.check(t0, &"alice"), Err(Duration::from_secs(1)));
        b.fail(t0, &"alice");
        assert_eq!(b.check(t0, &"alice"), Err(Duration::from_secs(2)));
        for _ in 0..20 {
            b.fail(t0, &"alice");
        }
        assert_eq!(b.check(t0, &"alice"), Err(Duration::from_secs(60)));
        assert!(b.check(t0, &"bob").is_ok());
        b.succeed(&"alice");
        assert!(b.check(t0, &"alice").is_ok());
    }

    #[test]
    fn backoff_table_is_bounded() {
        let t0 = Instant::now();
        let mut b = Backoff::new(0, Duration::from_secs(60), Duration::from_secs(3600), 8);
        for k in 0..1000 {
            b.fail(t0, &k);
        }
        assert_eq!(b.len(), 8);
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
    }

    proptest! {
        #[test]
        fn never_more_than_burst_plus_rate_times_elapsed(
            steps in proptest::collection::vec((0u64..300, 0u8..4), 1..200)
        ) {
            let t0 = Instant::now();
            let rate = Rate::new(5, 10.0);
            let mut l = Limiter::new(rate, 2);
            let mut t = t0;
            let mut passed = [0u32; 4];
            for (dt, k) in steps {
                t += Duration::from_millis(dt);
                if l.check(t, &k).is_ok() {
                    passed[k as usize] += 1;
                }
            }
            let elapsed = t.duration_since(t0).as_secs_f64();
            let bound = (rate.burst as f64 + rate.per_second * elapsed).floor() as u32;
            // Tracked keys and the overflow bucket each obey the bound; at most 3 budgets.
            prop_assert!(passed.iter().sum::<u32>() <= 3 * bound);
        }
    }
}
