//! Sliding-window replay protection for datagram counters (RFC 6479 style, as in WireGuard).

/// Counters this far behind the highest one seen are still accepted once.
pub const WINDOW: u64 = 2048;
const WORDS: usize = (WINDOW / 64) as usize;

/// Remembers which recent counters have been seen.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    top: u64,
    any: bool,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        ReplayWindow {
            top: 0,
            any: false,
            bits: [0; WORDS],
        }
    }

    /// Whether `c` would be accepted (new and not too old). Does not record it.
    pub fn check(&self, c: u64) -> bool {
        if !self.any || c > self.top {
            return true;
        }
        if self.top - c >= WINDOW {
            return false;
        }
        let (w, b) = Self::slot(c);
        self.bits[w] & (1 << b) == 0
    }

    /// Records `c` as seen; returns false (and changes nothing) if it was a replay or too old.
    /// Call only after the packet authenticated.
    pub fn accept(&mut self, c: u64) -> bool {
        if !self.check(c) {
            return false;
        }
        if !self.any || c > self.top {
            let first = if self.any { self.top + 1 } else { c };
            if !self.any || c - self.top >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                // Clear the slots the window slides over.
                let mut x = first;
                while x < c {
                    let (w, b) = Self::slot(x);
                    self.bits[w] &= !(1 << b);
                    x += 1;
                }
            }
            self.top = c;
            self.any = true;
        }
        let (w, b) = Self::slot(c);
        self.bits[w] |= 1 << b;
        true
    }

    fn slot(c: u64) -> (usize, u32) {
        let i = c % WINDOW;
        ((i / 64) as usize, (i % 64) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn rejects_duplicates_and_ancient_counters() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(5));
        assert!(!w.accept(5));
        assert!(w.accept(3));
        assert!(w.accept(5000));
        assert!(!w.accept(5000 - WINDOW));
        assert!(w.accept(5000 - WINDOW + 1));
        assert!(!w.accept(5000 - WINDOW + 1));
    }

    proptest! {
        /// Against a reference model: accept iff never seen and within the window of the max.
        #[test]
        fn matches_reference_model(seq in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::new();
            let mut seen = BTreeSet::new();
            let mut top: Option<u64> = None;
            for c in seq {
                let fresh = !seen.contains(&c);
                let in_window = top.is_none_or(|t| c > t || t - c < WINDOW);
                let expect = fresh && in_window;
                prop_assert_eq!(w.accept(c), expect, "counter {}", c);
                if expect {
                    seen.insert(c);
                    top = Some(top.map_or(c, |t| t.max(c)));
                }
            }
        }
    }
}
