//! A seeded network emulator on virtual time, for deterministic tests of the cores.
//!
//! Datagrams sent at `now` are delivered after a delay drawn from the seed, possibly
//! dropped, duplicated or reordered. Nothing here touches a socket or the real clock.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
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
    nats: Vec<Nat>,
    /// Private address -> the NAT it sits behind.
    behind: HashMap<SocketAddr, usize>,
    /// IP pairs between which every datagram is lost (a broken path), both directions.
    blocked: HashSet<(IpAddr, IpAddr)>,
}

/// How a simulated NAT maps and filters (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestricted,
    /// Endpoint-dependent mapping (a new random port per destination, as Linux's
    /// `masquerade random`), port-dependent filtering.
    Symmetric,
}

/// A simulated NAT with one public address.
#[derive(Debug)]
pub struct Nat {
    kind: NatKind,
    public: IpAddr,
    next_port: u16,
    /// (private source, destination if symmetric) -> public port.
    out: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// public port -> private address.
    back: HashMap<u16, SocketAddr>,
    /// (public port, remote) pairs the inside has sent to.
    contacted: HashSet<(u16, SocketAddr)>,
}

impl Nat {
    fn outbound(&mut self, src: SocketAddr, dst: SocketAddr, random: u32) -> SocketAddr {
        let key = (src, (self.kind == NatKind::Symmetric).then_some(dst));
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                let p = if self.kind == NatKind::Symmetric {
                    // Random over the whole range, skipping ports in use.
                    let mut p = 1024 + (random % 64_512) as u16;
                    while self.back.contains_key(&p) {
                        p = if p == u16::MAX { 1024 } else { p + 1 };
                    }
                    p
                } else {
                    let p = self.next_port;
                    self.next_port += 7; // not port-preserving: peers must learn real ports
                    p
                };
                self.out.insert(key, p);
                self.back.insert(p, src);
                p
            }
        };
        self.contacted.insert((port, dst));
        SocketAddr::new(self.public, port)
    }

    fn inbound(&self, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        let inside = *self.back.get(&port)?;
        let allowed = match self.kind {
            NatKind::FullCone => true,
            NatKind::Restricted => self
                .contacted
                .iter()
                .any(|(p, r)| *p == port && r.ip() == from.ip()),
            NatKind::PortRestricted | NatKind::Symmetric => self.contacted.contains(&(port, from)),
        };
        allowed.then_some(inside)
    }
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
            nats: Vec::new(),
            behind: HashMap::new(),
            blocked: HashSet::new(),
        }
    }

    /// Adds a NAT with public address `public`; returns its id.
    pub fn add_nat(&mut self, kind: NatKind, public: IpAddr) -> usize {
        self.nats.push(Nat {
            kind,
            public,
            next_port: 20_000,
            out: HashMap::new(),
            back: HashMap::new(),
            contacted: HashSet::new(),
        });
        self.nats.len() - 1
    }

    /// Loses every datagram between `a` and `b` until [`Net::unblock`].
    pub fn block(&mut self, a: IpAddr, b: IpAddr) {
        self.blocked.insert((a, b));
        self.blocked.insert((b, a));
    }

    /// Heals a path broken by [`Net::block`].
    pub fn unblock(&mut self, a: IpAddr, b: IpAddr) {
        self.blocked.remove(&(a, b));
        self.blocked.remove(&(b, a));
    }

    /// Puts the host with private address `addr` behind NAT `nat`.
    pub fn place_behind(&mut self, addr: SocketAddr, nat: usize) {
        self.behind.insert(addr, nat);
    }

    fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn send(&mut self, now: Instant, from: SocketAddr, t: Transmit) {
        self.sent += 1;
        let from = match (
            self.behind.get(&from).copied(),
            self.behind.get(&t.dst).copied(),
        ) {
            // Hosts behind the same NAT reach each other's private addresses directly.
            (Some(a), Some(b)) if a == b => from,
            // A private address of another network is unreachable.
            (_, Some(_)) => return,
            (Some(a), None) => {
                let r = self.rng.next_u32();
                self.nats[a].outbound(from, t.dst, r)
            }
            (None, None) => from,
        };
        if self.blocked.contains(&(from.ip(), t.dst.ip())) {
            return;
        }
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
        due.into_iter()
            .filter_map(|(_, from, mut t)| {
                if let Some(nat) = self.nats.iter().find(|n| n.public == t.dst.ip()) {
                    t.dst = nat.inbound(t.dst.port(), from)?;
                }
                Some((from, t))
            })
            .collect()
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
