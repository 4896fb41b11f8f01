//! Sliding-window replay protection for datagram counters (RFC 6479 style, as in WireGuard).
//!
//! Two sizes: [`WINDOW`] counters for sessions that carry call media (bursts and
//! reordering), [`SMALL_WINDOW`] for control sessions such as a client's to its supernode,
//! which send a few packets a minute: a supernode holds a million of them, and the small
//! window keeps its bits inline (16 bytes) instead of 256 bytes on the heap.

/// Counters this far behind the highest one seen are still accepted once (media sessions).
pub const WINDOW: u64 = 2048;
const WORDS: usize = (WINDOW / 64) as usize;
/// The window of a control session ([`ReplayWindow::small`]).
pub const SMALL_WINDOW: u64 = 128;
const SMALL_WORDS: usize = (SMALL_WINDOW / 64) as usize;

#[derive(Clone, Debug)]
enum Bits {
    Small([u64; SMALL_WORDS]),
    Large(Box<[u64; WORDS]>),
}

impl Bits {
    fn words(&mut self) -> &mut [u64] {
        match self {
            Bits::Small(b) => b,
            Bits::Large(b) => &mut b[..],
        }
    }
}

/// Remembers which recent counters have been seen.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    top: u64,
    any: bool,
    bits: Bits,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// An empty window of [`WINDOW`] counters.
    pub fn new() -> Self {
        ReplayWindow {
            top: 0,
            any: false,
            bits: Bits::Large(Box::new([0; WORDS])),
        }
    }

    /// An empty window of [`SMALL_WINDOW`] counters, for control sessions.
    pub fn small() -> Self {
        ReplayWindow {
            top: 0,
            any: false,
            bits: Bits::Small([0; SMALL_WORDS]),
        }
    }

    /// How many counters behind the highest one are still accepted.
    pub fn size(&self) -> u64 {
        match self.bits {
            Bits::Small(_) => SMALL_WINDOW,
            Bits::Large(_) => WINDOW,
        }
    }

    /// Whether `c` would be accepted (new and not too old). Does not record it.
    pub fn check(&self, c: u64) -> bool {
        if !self.any || c > self.top {
            return true;
        }
        let size = self.size();
        if self.top - c >= size {
            return false;
        }
        let (w, b) = Self::slot(c, size);
        let word = match &self.bits {
            Bits::Small(bits) => bits[w],
            Bits::Large(bits) => bits[w],
        };
        word & (1 << b) == 0
    }

    /// Records `c` as seen; returns false (and changes nothing) if it was a replay or too old.
    /// Call only after the packet authenticated.
    pub fn accept(&mut self, c: u64) -> bool {
        if !self.check(c) {
            return false;
        }
        let size = self.size();
        let bits = self.bits.words();
        if !self.any || c > self.top {
            if !self.any || c - self.top >= size {
                bits.fill(0);
            } else {
                // Clear the slots the window slides over.
                let mut x = self.top + 1;
                while x < c {
                    let (w, b) = Self::slot(x, size);
                    bits[w] &= !(1 << b);
                    x += 1;
                }
            }
            self.top = c;
            self.any = true;
        }
        let (w, b) = Self::slot(c, size);
        bits[w] |= 1 << b;
        true
    }

    fn slot(c: u64, size: u64) -> (usize, u32) {
        let i = c % size;
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

    #[test]
    fn small_window_rejects_what_falls_out_of_it() {
        let mut w = ReplayWindow::small();
        assert!(w.accept(1000));
        assert!(!w.accept(1000 - SMALL_WINDOW));
        assert!(w.accept(1000 - SMALL_WINDOW + 1));
        assert!(!w.accept(1000 - SMALL_WINDOW + 1));
        assert!(w.accept(999));
    }

    proptest! {
        /// Against a reference model: accept iff never seen and within the window of the max.
        #[test]
        fn matches_reference_model(
            seq in proptest::collection::vec(0u64..6000, 1..400),
            small in any::<bool>(),
        ) {
            let mut w = if small { ReplayWindow::small() } else { ReplayWindow::new() };
            let size = w.size();
            let mut seen = BTreeSet::new();
            let mut top: Option<u64> = None;
            for c in seq {
                let fresh = !seen.contains(&c);
                let in_window = top.is_none_or(|t| c > t || t - c < size);
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
