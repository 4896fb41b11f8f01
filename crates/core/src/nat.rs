//! NAT behaviour discovery and the birthday technique for endpoint-dependent NATs.
//!
//! A client learns whether its NAT gives each destination a new public port by asking two
//! STUN servers it already talks to (the supernode and the TURN relay) for its reflexive
//! address from one socket: two different answers mean endpoint-dependent ("hard") mapping.
//!
//! Between a hard side and an easy side (endpoint-independent mapping), hole punching to
//! the exchanged ports cannot work: the hard NAT opens a port nobody knows in advance. The
//! birthday technique still finds a pair: the hard side opens many sockets, each sending to
//! the easy side's address (so its NAT holds many mappings towards it), while the easy side
//! sends probes to random ports of the hard side's public address. With `k` mappings out of
//! `r` possible ports and `n` probes, a probe lands on an open mapping with probability
//! about `1 - exp(-k * n / r)`: 256 sockets and 2048 probes over 64,512 ports make that
//! 99.97 %. Both counts are bounded, as is the time spent.
//!
//! Sans-IO: the client core calls these with the time and random numbers it is given.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use stun_types::attribute::XorMappedAddress;
use stun_types::message::{
    Message, MessageClass, MessageType, MessageWrite, MessageWriteExt, MessageWriteVec,
    TransactionId, BINDING,
};

/// A STUN Binding request (RFC 8489) with transaction id `tid` (96 bits used).
pub fn binding_request(tid: u128) -> Vec<u8> {
    let mut m = Message::builder(
        MessageType::from_class_method(MessageClass::Request, BINDING),
        TransactionId::from(tid),
        MessageWriteVec::new(),
    );
    // A FINGERPRINT lets servers that share the port with other protocols tell STUN apart.
    let _ = m.add_fingerprint();
    m.finish()
}

/// The transaction id and XOR-MAPPED-ADDRESS of a Binding success response. Total.
pub fn binding_success(bytes: &[u8]) -> Option<(u128, SocketAddr)> {
    let msg = Message::from_bytes(bytes).ok()?;
    if !msg.has_class(MessageClass::Success) || !msg.has_method(BINDING) {
        return None;
    }
    let tid = msg.transaction_id();
    let mapped = msg.attribute::<XorMappedAddress>().ok()?;
    Some((u128::from(tid), mapped.addr(tid)))
}

/// Attempts per server before giving up on an answer.
const MAPPING_ATTEMPTS: u32 = 3;
/// Wait between attempts.
const MAPPING_RETRY: Duration = Duration::from_millis(500);

#[derive(Debug)]
struct Query {
    tid: u128,
    attempts: u32,
    next: Instant,
}

/// Learns the reflexive address that each of a few STUN servers sees.
#[derive(Debug, Default)]
pub struct MappingProbe {
    queries: HashMap<SocketAddr, Query>,
    answers: HashMap<SocketAddr, SocketAddr>,
}

impl MappingProbe {
    /// Asks `server` (again) from now on; `tid` must be fresh and unpredictable.
    pub fn ask(&mut self, now: Instant, server: SocketAddr, tid: u128) {
        self.answers.remove(&server);
        self.queries.insert(
            server,
            Query {
                tid: tid & ((1u128 << 96) - 1),
                attempts: 0,
                next: now,
            },
        );
    }

    /// Requests due at `now`, as `(server, bytes)`.
    pub fn poll_requests(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        self.queries.retain(|server, q| {
            if q.attempts >= MAPPING_ATTEMPTS {
                return false;
            }
            if now >= q.next {
                q.attempts += 1;
                q.next = now + MAPPING_RETRY;
                out.push((*server, binding_request(q.tid)));
            }
            true
        });
        out
    }

    /// When a request is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.queries.values().map(|q| q.next).min()
    }

    /// Takes a datagram from `from`; true if it was the answer to one of our requests.
    pub fn handle(&mut self, from: SocketAddr, bytes: &[u8]) -> bool {
        let Some(q) = self.queries.get(&from) else {
            return false;
        };
        match binding_success(bytes) {
            Some((tid, mapped)) if tid == q.tid => {
                self.queries.remove(&from);
                self.answers.insert(from, mapped);
                true
            }
            _ => false,
        }
    }

    /// Stops asking `server` and forgets its answer (the client left that supernode).
    pub fn forget(&mut self, server: SocketAddr) {
        self.queries.remove(&server);
        self.answers.remove(&server);
    }

    /// The reflexive address `server` reported.
    pub fn mapped(&self, server: SocketAddr) -> Option<SocketAddr> {
        self.answers.get(&server).copied()
    }

    /// Whether two servers saw different reflexive addresses: the NAT's mapping depends on
    /// the destination. False until two answers are in.
    pub fn endpoint_dependent(&self) -> bool {
        let mut it = self.answers.values();
        match it.next() {
            Some(first) => it.any(|a| a != first),
            None => false,
        }
    }
}

/// Birthday-technique parameters.
#[derive(Debug, Clone)]
pub struct BirthdayConfig {
    /// Sockets the hard side opens.
    pub sockets: usize,
    /// Probes the easy side sends in all.
    pub probes: usize,
    /// Probes per burst.
    pub burst: usize,
    /// Time between bursts.
    pub burst_interval: Duration,
    /// Delay before the hard side's first round: ordinary hole punching gets its chance
    /// first (it works when the other NAT filters only by address, or there is none).
    pub open_delay: Duration,
    /// Delay before the easy side's first burst (the hard side opens its mappings first).
    pub spray_delay: Duration,
    /// Time between the hard side's rounds of sends from every socket.
    pub open_interval: Duration,
    /// How long either side keeps at it.
    pub window: Duration,
    /// Ports the easy side guesses from.
    pub ports: RangeInclusive<u16>,
}

impl Default for BirthdayConfig {
    fn default() -> Self {
        BirthdayConfig {
            sockets: 256,
            probes: 2048,
            burst: 128,
            burst_interval: Duration::from_millis(40),
            open_delay: Duration::from_millis(300),
            spray_delay: Duration::from_millis(400),
            open_interval: Duration::from_millis(500),
            window: Duration::from_secs(3),
            // Linux's masquerade with random ports and most home routers draw from here.
            ports: 1024..=65535,
        }
    }
}

/// Which side of a birthday attempt we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Our NAT is hard: send from every extra socket to the peer's address.
    Hard {
        /// The easy side's reflexive address.
        target: SocketAddr,
    },
    /// The peer's NAT is hard: spray probes at random ports of its public address.
    Easy {
        /// The hard side's public address.
        ip: IpAddr,
        /// Probes sent so far.
        sent: usize,
    },
}

/// One birthday attempt towards a peer.
#[derive(Debug, Clone)]
pub struct Birthday {
    /// Our side.
    pub role: Role,
    /// Next burst or round.
    pub next: Instant,
    /// End of the attempt.
    pub until: Instant,
}

/// What one step of an attempt sends.
#[derive(Debug, PartialEq, Eq)]
pub enum Sends {
    /// Nothing now.
    None,
    /// One probe from each extra socket to this address.
    FromEverySocket(SocketAddr),
    /// Probes from the main socket to these addresses.
    Spray(Vec<SocketAddr>),
}

impl Birthday {
    /// Decides whether a pair needs the technique and which side we are: exactly one side
    /// hard, and the peer offered a public address (`peer_public`, the reflexive candidate
    /// the supernode saw).
    pub fn start(
        cfg: &BirthdayConfig,
        now: Instant,
        we_are_hard: bool,
        peer_is_hard: bool,
        peer_public: SocketAddr,
    ) -> Option<Birthday> {
        let role = match (we_are_hard, peer_is_hard) {
            (true, false) => Role::Hard {
                target: peer_public,
            },
            (false, true) => Role::Easy {
                ip: peer_public.ip(),
                sent: 0,
            },
            // Neither: ordinary punching works. Both: the odds are hopeless; the relay it is.
            _ => return None,
        };
        let next = match role {
            Role::Hard { .. } => now + cfg.open_delay,
            Role::Easy { .. } => now + cfg.spray_delay,
        };
        Some(Birthday {
            role,
            next,
            until: now + cfg.window,
        })
    }

    /// Whether the attempt is over at `now`.
    pub fn finished(&self, cfg: &BirthdayConfig, now: Instant) -> bool {
        now >= self.until || matches!(self.role, Role::Easy { sent, .. } if sent >= cfg.probes)
    }

    /// The sends due at `now`; `random` draws the easy side's port guesses.
    pub fn step(
        &mut self,
        cfg: &BirthdayConfig,
        now: Instant,
        mut random: impl FnMut() -> u32,
    ) -> Sends {
        if now < self.next || self.finished(cfg, now) {
            return Sends::None;
        }
        match &mut self.role {
            Role::Hard { target } => {
                self.next = now + cfg.open_interval;
                Sends::FromEverySocket(*target)
            }
            Role::Easy { ip, sent } => {
                let n = cfg.burst.min(cfg.probes - *sent);
                *sent += n;
                self.next = now + cfg.burst_interval;
                let (lo, hi) = (*cfg.ports.start() as u32, *cfg.ports.end() as u32);
                let span = hi.saturating_sub(lo) + 1;
                Sends::Spray(
                    (0..n)
                        .map(|_| SocketAddr::new(*ip, (lo + random() % span) as u16))
                        .collect(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn binding_request_is_answered_by_the_supernode_responder() {
        let req = binding_request(0xdead_beef);
        let from = addr("192.0.2.7:40000");
        let resp = crate::stun::answer(&req, from).expect("a Binding request");
        assert_eq!(binding_success(&resp), Some((0xdead_beef, from)));
    }

    #[test]
    fn two_different_reflexive_addresses_mean_endpoint_dependent_mapping() {
        let now = Instant::now();
        let (sn, relay) = (addr("203.0.113.1:443"), addr("203.0.113.2:3478"));
        let mut p = MappingProbe::default();
        p.ask(now, sn, 1);
        p.ask(now, relay, 2);
        let reqs = p.poll_requests(now);
        assert_eq!(reqs.len(), 2);
        for (server, req) in &reqs {
            let seen = if *server == sn {
                addr("198.51.100.9:1111")
            } else {
                addr("198.51.100.9:2222")
            };
            let resp = crate::stun::answer(req, seen).unwrap();
            assert!(p.handle(*server, &resp));
        }
        assert!(p.endpoint_dependent());
        assert_eq!(p.mapped(sn), Some(addr("198.51.100.9:1111")));
    }

    #[test]
    fn same_reflexive_address_is_endpoint_independent_and_strangers_are_ignored() {
        let now = Instant::now();
        let (sn, relay) = (addr("203.0.113.1:443"), addr("203.0.113.2:3478"));
        let mut p = MappingProbe::default();
        p.ask(now, sn, 1);
        p.ask(now, relay, 2);
        let reqs = p.poll_requests(now);
        let seen = addr("198.51.100.9:1111");
        for (server, req) in &reqs {
            let resp = crate::stun::answer(req, seen).unwrap();
            // The same answer from a third address, or for the wrong request, is ignored.
            assert!(!p.handle(addr("203.0.113.66:443"), &resp));
            assert!(p.handle(*server, &resp));
        }
        assert!(!p.endpoint_dependent());
        // A forged answer with an unknown transaction id changes nothing.
        p.ask(now, sn, 7);
        let forged = crate::stun::answer(&binding_request(8), addr("1.2.3.4:5")).unwrap();
        assert!(!p.handle(sn, &forged));
        assert_eq!(p.mapped(sn), None);
    }

    #[test]
    fn unanswered_requests_are_retried_a_bounded_number_of_times() {
        let mut now = Instant::now();
        let mut p = MappingProbe::default();
        p.ask(now, addr("203.0.113.1:443"), 1);
        let mut sent = 0;
        for _ in 0..20 {
            sent += p.poll_requests(now).len();
            now += MAPPING_RETRY;
        }
        assert_eq!(sent, MAPPING_ATTEMPTS as usize);
        assert_eq!(p.poll_timeout(), None, "given up: no more timers");
    }

    #[test]
    fn only_a_hard_easy_pair_starts_and_roles_follow_the_hard_side() {
        let cfg = BirthdayConfig::default();
        let now = Instant::now();
        let peer = addr("198.51.100.9:1111");
        assert!(Birthday::start(&cfg, now, false, false, peer).is_none());
        assert!(Birthday::start(&cfg, now, true, true, peer).is_none());
        let hard = Birthday::start(&cfg, now, true, false, peer).unwrap();
        assert_eq!(hard.role, Role::Hard { target: peer });
        let easy = Birthday::start(&cfg, now, false, true, peer).unwrap();
        assert!(matches!(easy.role, Role::Easy { ip, sent: 0 } if ip == peer.ip()));
        assert!(
            easy.next > now,
            "the easy side waits for the mappings to open"
        );
    }

    #[test]
    fn the_easy_side_sends_exactly_the_probe_budget_within_the_port_range() {
        let cfg = BirthdayConfig::default();
        let mut now = Instant::now();
        let peer = addr("198.51.100.9:1111");
        let mut b = Birthday::start(&cfg, now, false, true, peer).unwrap();
        let mut x = 12345u32;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        let mut total = 0;
        while now < b.until + Duration::from_secs(1) {
            if let Sends::Spray(v) = b.step(&cfg, now, &mut rnd) {
                assert!(v.len() <= cfg.burst);
                for a in &v {
                    assert_eq!(a.ip(), peer.ip());
                    assert!(cfg.ports.contains(&a.port()));
                }
                total += v.len();
            }
            now += Duration::from_millis(10);
        }
        assert_eq!(total, cfg.probes);
        assert!(b.finished(&cfg, now));
    }

    #[test]
    fn the_hard_side_opens_its_mappings_in_rounds_until_the_window_closes() {
        let cfg = BirthdayConfig::default();
        let start = Instant::now();
        let mut now = start;
        let peer = addr("198.51.100.9:1111");
        let mut b = Birthday::start(&cfg, now, true, false, peer).unwrap();
        let mut rounds = 0;
        assert_eq!(b.next, start + cfg.open_delay, "plain punching goes first");
        while now < start + cfg.window * 2 {
            if let Sends::FromEverySocket(t) = b.step(&cfg, now, || 0) {
                assert_eq!(t, peer);
                assert!(now < start + cfg.window);
                rounds += 1;
            }
            now += Duration::from_millis(10);
        }
        let expected = (cfg.window - cfg.open_delay)
            .as_millis()
            .div_ceil(cfg.open_interval.as_millis());
        assert_eq!(rounds as u128, expected);
    }

    proptest! {
        #[test]
        fn binding_success_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = binding_success(&bytes);
            let mut p = MappingProbe::default();
            p.ask(Instant::now(), addr("203.0.113.1:443"), 1);
            let _ = p.handle(addr("203.0.113.1:443"), &bytes);
        }
    }
}
