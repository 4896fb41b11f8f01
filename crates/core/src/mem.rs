//! Giving memory back from tables that grow in bursts.
//!
//! A login storm queues hundreds of thousands of storage operations for a few seconds;
//! Rust's maps and queues keep their largest capacity forever, so without this the burst
//! would stay in the supernode's memory for its whole life.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};

/// Below this capacity a table is left alone (not worth a reallocation).
const SMALL: usize = 1024;

/// Shrinks `map` to twice its length once it uses less than an eighth of its capacity.
/// The hysteresis keeps the cost amortised: a shrink halves the capacity at least four
/// times over, and growing back needs as many inserts as the shrink moved.
pub fn shrink_map<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>) {
    let cap = map.capacity();
    if cap > SMALL && map.len() < cap / 8 {
        map.shrink_to((map.len() * 2).max(SMALL / 2));
    }
}

/// As [`shrink_map`], for a queue.
pub fn shrink_queue<T>(queue: &mut VecDeque<T>) {
    let cap = queue.capacity();
    if cap > SMALL && queue.len() < cap / 8 {
        queue.shrink_to((queue.len() * 2).max(SMALL / 2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_burst_gives_its_capacity_back() {
        let mut m: HashMap<u64, u64> = (0..100_000).map(|i| (i, i)).collect();
        let mut q: VecDeque<u64> = (0..100_000).collect();
        let big = m.capacity();
        for i in 0..99_990 {
            m.remove(&i);
            shrink_map(&mut m);
            q.pop_front();
            shrink_queue(&mut q);
        }
        assert_eq!(m.len(), 10);
        assert!(m.capacity() <= SMALL, "{} of {}", m.capacity(), big);
        assert!(q.capacity() <= SMALL);
        assert!((99_990..100_000).all(|i| m.get(&i) == Some(&i)));
        assert!(q.iter().copied().eq(99_990..100_000));
    }

    #[test]
    fn small_or_busy_tables_are_left_alone() {
        let mut m: HashMap<u64, u64> = (0..100).map(|i| (i, i)).collect();
        m.retain(|k, _| *k < 2);
        let cap = m.capacity();
        shrink_map(&mut m);
        assert_eq!(m.capacity(), cap);
        let mut busy: HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        busy.retain(|k, _| *k < 5_000);
        let cap = busy.capacity();
        shrink_map(&mut busy);
        assert_eq!(busy.capacity(), cap);
    }
}
