//! A seeded network emulator on virtual time, for deterministic tests of the cores.
//!
//! Datagrams sent at `now` are delivered after a delay drawn from the seed, possibly
//! dropped, duplicated or reordered. Nothing here touches a socket or the real clock.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::link::{Link, LinkConfig, Transmit};

/// The emulated network.
pub struct Net {
    rng: ChaCha20Rng,
    loss: f64,
    dup: f64,
    max_delay: Duration,
    in_flight: Vec<(Instant, SocketAddr, Transmit)>,
    /// Datagrams handed to the network.
    pub sent: u64,
}

impl Net {
    pub fn perfect(seed: u64) -> Self {
        Self::lossy(seed, 0.0, 0.0, Duration::ZERO)
    }

    pub fn lossy(seed: u64, loss: f64, dup: f64, max_delay: Duration) -> Self {
        Net {
            rng: ChaCha20Rng::seed_from_u64(seed),
            loss,
            dup,
            max_delay,
            in_flight: Vec::new(),
            sent: 0,
        }
    }

    fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn send(&mut self, now: Instant, from: SocketAddr, t: Transmit) {
        self.sent += 1;
        if self.unit() < self.loss {
            return;
        }
        let copies = if self.unit() < self.dup { 2 } else { 1 };
        for _ in 0..copies {
            let d = self.max_delay.mul_f64(self.unit());
            self.in_flight.push((now + d, from, t.clone()));
        }
    }

    /// Datagrams due at `now`, in arrival order (reordered by their random delays).
    pub fn deliver(&mut self, now: Instant) -> Vec<(SocketAddr, Transmit)> {
        let mut due: Vec<_> = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].0 <= now {
                due.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|(t, _, _)| *t);
        due.into_iter().map(|(_, from, t)| (from, t)).collect()
    }

    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }
}

/// Two links joined by a completed handshake (client-style `a`, server-style `b`).
pub fn link_pair(now: Instant, a_addr: SocketAddr, b_addr: SocketAddr) -> (Link, Link) {
    link_pair_cfg(
        now,
        a_addr,
        b_addr,
        LinkConfig::client(),
        LinkConfig::server(),
    )
}

/// As [`link_pair`] with explicit configurations.
pub fn link_pair_cfg(
    now: Instant,
    a_addr: SocketAddr,
    b_addr: SocketAddr,
    ca: LinkConfig,
    cb: LinkConfig,
) -> (Link, Link) {
    use peerline_crypto::noise::{Handshake, Responder};
    use peerline_crypto::DeviceKeys;
    let ka = DeviceKeys::generate(&mut ChaCha20Rng::seed_from_u64(100));
    let kb = DeviceKeys::generate(&mut ChaCha20Rng::seed_from_u64(200));
    let (hs, m1) =
        Handshake::initiate(&ka.noise_private(), &kb.noise_public(), [1; 32], b"").unwrap();
    let r = Responder::read(&kb.noise_private(), [2; 32], &m1).unwrap();
    let (tb, m2) = r.accept(b"").unwrap();
    let (ta, _) = hs.finish(&m2).unwrap();
    (
        Link::new(ca, ta, 1, 2, b_addr, now),
        Link::new(cb, tb, 2, 1, a_addr, now),
    )
}
