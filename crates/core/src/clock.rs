//! Wall-clock time derived from the monotonic `now` the driver passes in.
//!
//! Cores take `now: Instant` for timers. Certificates and message timestamps need wall
//! time; the driver supplies one anchor pair at construction and the core derives wall
//! time from it, so simulations stay deterministic.

use std::time::Instant;

/// An anchor between a monotonic instant and unix milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    at: Instant,
    unix_ms: u64,
}

impl WallClock {
    /// `unix_ms` was the wall time at `at`.
    pub fn new(at: Instant, unix_ms: u64) -> Self {
        WallClock { at, unix_ms }
    }

    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.at).as_millis();
        self.unix_ms
            .saturating_add(u64::try_from(d).unwrap_or(u64::MAX))
    }

    /// Unix seconds at `now`.
    pub fn unix_s(&self, now: Instant) -> u64 {
        self.unix_ms(now) / 1000
    }
}
