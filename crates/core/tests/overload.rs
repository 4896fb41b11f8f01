//! Honest overload on virtual time: a re-login storm while users already in keep alive.
//! Keepalives are answered before any handshake of the same batch, initiations the
//! supernode cannot serve soon get a `Busy` with a retry-after (no Diffie-Hellman), and
//! every client gets in without ever timing out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_core::client::{busy_wait, Client, ClientConfig, ClientEvent};
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::link::{Link, LinkConfig};
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::supernode::{DropReason, Limits, Supernode, SupernodeConfig};
use peerline_crypto::cert::CertRequest;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_wire::msg::Presence;
use peerline_wire::packet::{Packet, RejectReason};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const UNIX_START_MS: u64 = 1_790_000_000_000;
const STEP: Duration = Duration::from_millis(5);
const BUDGET: usize = 4;

fn sn_addr() -> SocketAddr {
    "203.0.113.1:7000".parse().unwrap()
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        std::net::Ipv4Addr::from(0xc633_6400 + i as u32).into(),
        4000 + i as u16,
    )
}

/// A user already in: a hand-driven session that only keeps alive, every 100 ms.
struct Raw {
    addr: SocketAddr,
    link: Link,
}

struct Storm {
    now: Instant,
    t0: Instant,
    sn: Supernode,
    sn_keys: DeviceKeys,
    authority: Authority,
    store: MemoryStore,
    rng: ChaCha20Rng,
    raws: Vec<Raw>,
    clients: Vec<(SocketAddr, Client)>,
    events: Vec<Vec<ClientEvent>>,
    /// Datagrams for the supernode: one batch per step.
    to_sn: Vec<(SocketAddr, Vec<u8>)>,
    /// Keepalives answered within their batch (before any handshake of it).
    keepalives_answered: usize,
    busy_seen: usize,
    /// Storage stalled: operations wait here instead of being executed.
    store_paused: bool,
    held_ops: Vec<(u64, peerline_core::ops::Op)>,
}

impl Storm {
    fn new(limits: Limits) -> Self {
        Self::with_budget(limits, BUDGET)
    }

    fn with_budget(limits: Limits, budget: usize) -> Self {
        Self::with_config(SupernodeConfig {
            limits,
            handshake_budget: budget,
            ..SupernodeConfig::default()
        })
    }

    fn with_config(cfg: SupernodeConfig) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let authority = Authority::generate(&mut rng);
        let t0 = Instant::now();
        let sn = Supernode::new(
            cfg,
            sn_keys.noise_private(),
            Authority::from_bytes(&authority.to_bytes()),
            [3; 32],
            Box::new(MemoryDirectory::new()),
            WallClock::new(t0, UNIX_START_MS),
            t0,
        );
        Storm {
            now: t0,
            t0,
            sn,
            sn_keys,
            authority,
            store: MemoryStore::new(),
            rng,
            raws: Vec::new(),
            clients: Vec::new(),
            events: Vec::new(),
            to_sn: Vec::new(),
            keepalives_answered: 0,
            busy_seen: 0,
            store_paused: false,
            held_ops: Vec::new(),
        }
    }

    fn unix_ms(&self) -> u64 {
        UNIX_START_MS + self.now.duration_since(self.t0).as_millis() as u64
    }

    fn cert(&mut self, name: &str, keys: &DeviceKeys) -> Vec<u8> {
        let req = CertRequest {
            username: Username::parse(name).unwrap(),
            device_id: [self.rng.next_u32() as u8; 16],
            noise_key: keys.noise_public(),
            sign_key: keys.sign_public(),
        };
        let serial = self.rng.next_u64() >> 1;
        let now_s = self.unix_ms() / 1000;
        self.authority.issue(&req, serial, now_s, 86_400).to_bytes()
    }

    /// Logs a user in by hand, outside any batch (served at once, as before batching).
    fn add_raw(&mut self, i: usize) {
        let keys = DeviceKeys::generate(&mut self.rng);
        let cert = self.cert(&format!("old{i:04}"), &keys);
        let (unix_ms, sn_public) = (self.unix_ms(), self.sn_keys.noise_public());
        let (hs, p, index) =
            support::initiation(&mut self.rng, &keys, &sn_public, Some(cert), unix_ms);
        let from = addr(i);
        self.sn.handle_datagram(self.now, from, &p);
        let t = self
            .sn
            .poll_transmit()
            .expect("served at once outside a batch");
        let Ok(Packet::HandshakeResponse {
            sender,
            receiver,
            noise,
        }) = Packet::decode(&t.payload)
        else {
            panic!("not a handshake response");
        };
        assert_eq!(receiver, index);
        let (transport, _) = hs.finish(noise).unwrap();
        let cfg = LinkConfig {
            keepalive: Some(Duration::from_millis(100)),
            ..LinkConfig::client()
        };
        let link = Link::new(cfg, transport, index, sender, sn_addr(), self.now);
        self.raws.push(Raw { addr: from, link });
    }

    fn add_client(&mut self, i: usize) {
        let keys = DeviceKeys::generate(&mut self.rng);
        let cert = self.cert(&format!("new{i:04}"), &keys);
        let cfg = ClientConfig::new(
            sn_addr(),
            self.sn_keys.noise_public(),
            self.authority.public(),
        );
        let elapsed = self.now.duration_since(self.t0).as_millis() as u64;
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let a = addr(1000 + i);
        let mut c = Client::new(
            cfg,
            keys,
            Some(&cert),
            seed,
            WallClock::new(self.now, UNIX_START_MS + elapsed),
            self.now,
        );
        c.set_local_candidates(vec![a]);
        c.connect(self.now);
        self.clients.push((a, c));
        self.events.push(Vec::new());
    }

    fn route_from_sn(&mut self, t: peerline_core::link::Transmit) {
        if let Some(r) = self.raws.iter_mut().find(|r| r.addr == t.dst) {
            if let Ok(Packet::Transport {
                counter,
                ciphertext,
                ..
            }) = Packet::decode(&t.payload)
            {
                let _ = r
                    .link
                    .handle_transport(self.now, sn_addr(), counter, ciphertext);
            }
            return;
        }
        if let Ok(Packet::Reject {
            reason: RejectReason::Busy { .. },
            ..
        }) = Packet::decode(&t.payload)
        {
            self.busy_seen += 1;
        }
        if let Some((_, c)) = self.clients.iter_mut().find(|(a, _)| *a == t.dst) {
            c.handle_datagram(self.now, sn_addr(), &t.payload);
        }
    }

    /// One batch: everything sent since the last step reaches the supernode together.
    fn step(&mut self) {
        let now = self.now;
        while let Some(op) = self.sn.poll_op() {
            self.held_ops.push(op);
        }
        if !self.store_paused {
            for (token, op) in std::mem::take(&mut self.held_ops) {
                let r = execute(&mut self.store, op, &mut self.rng);
                self.sn.handle_op_result(now, token, r);
            }
        }
        while let Some(t) = self.sn.poll_transmit() {
            self.route_from_sn(t);
        }
        for (i, (a, c)) in self.clients.iter_mut().enumerate() {
            while let Some(t) = c.poll_transmit() {
                if t.dst == sn_addr() {
                    self.to_sn.push((*a, t.payload));
                }
            }
            while let Some(e) = c.poll_event() {
                self.events[i].push(e);
            }
        }
        for r in &mut self.raws {
            r.link.handle_timeout(now);
            while let Some(t) = r.link.poll_transmit() {
                self.to_sn.push((r.addr, t.payload));
            }
            while r.link.poll_event().is_some() {}
        }
        let batch = std::mem::take(&mut self.to_sn);
        let reads = self.sn.stats().noise_reads;
        let mut answers = Vec::new();
        self.sn.begin_batch();
        for (from, bytes) in batch {
            self.sn.handle_datagram(now, from, &bytes);
            let keepalive = self.raws.iter().any(|r| r.addr == from);
            let before = answers.len();
            while let Some(t) = self.sn.poll_transmit() {
                answers.push(t);
            }
            if keepalive {
                // The echo is out before the batch's handshakes get any work.
                assert!(
                    answers[before..].iter().any(|t| t.dst == from),
                    "a keepalive of a user already in waited"
                );
                self.keepalives_answered += 1;
            }
            assert_eq!(
                self.sn.stats().noise_reads,
                reads,
                "no Diffie-Hellman before the batch's transport packets are answered"
            );
        }
        self.sn.end_batch(now);
        assert!(self.sn.stats().noise_reads - reads <= BUDGET as u64);
        for t in answers {
            self.route_from_sn(t);
        }
        self.now += STEP;
        let now = self.now;
        if self.sn.poll_timeout().is_some_and(|t| t <= now) {
            self.sn.handle_timeout(now);
        }
        for (_, c) in self.clients.iter_mut() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
    }
}

#[test]
fn a_login_storm_is_shed_with_busy_while_keepalives_are_answered_first() {
    let limits = Limits {
        max_queued_handshakes: 8,
        max_handshake_wait: Duration::from_millis(500),
        ..Limits::default()
    };
    let mut w = Storm::new(limits);
    for i in 0..20 {
        w.add_raw(i);
    }
    // Each one confirms its session with a first keepalive.
    for _ in 0..30 {
        w.step();
    }
    assert_eq!(w.sn.online_count(), 20);
    assert_eq!(w.sn.half_open_count(), 0);
    let reads_before = w.sn.stats().noise_reads;
    assert_eq!(reads_before, 20);

    // 150 users log in at once, as after a restart.
    const N: usize = 150;
    for i in 0..N {
        w.add_client(i);
    }
    let start = w.now;
    let mut all_in = None;
    while w.now < start + Duration::from_secs(20) {
        w.step();
        if all_in.is_none() && w.clients.iter().all(|(_, c)| c.is_online()) {
            all_in = Some(w.now - start);
            // A little longer: users already back keep alive undisturbed.
            for _ in 0..40 {
                w.step();
            }
            break;
        }
    }
    let took = all_in.expect("every client logged in");
    let s = w.sn.stats().clone();
    assert!(s.busy_sent > 0, "the storm was shed");
    assert_eq!(
        w.busy_seen as u64, s.busy_sent,
        "every Busy reached its client"
    );
    assert_eq!(
        s.drops_for(DropReason::Busy),
        s.busy_sent,
        "none over budget"
    );
    // Diffie-Hellman work only for handshakes that were served: one per session.
    assert_eq!(
        s.noise_reads,
        reads_before + N as u64,
        "no DH for a shed init"
    );
    assert_eq!(s.handshakes, s.noise_reads);
    assert_eq!(w.sn.online_count(), 20 + N);
    // Users already in were answered at every keepalive (100 ms each, for the whole storm).
    let storm_steps = (w.now - start).as_millis() as usize / STEP.as_millis() as usize;
    assert!(w.keepalives_answered >= 20 * (storm_steps / 20));
    // Nobody timed out: every refusal was said, with when to come back.
    for ev in &w.events {
        for e in ev {
            if let ClientEvent::Offline { reason } = e {
                assert!(reason.contains("busy"), "unexpected: {reason}");
            }
        }
    }
    // The 150 logins at the budget (4 per batch and 4 per timer pass, every 5 ms) take
    // at least 94 ms; the appointments and their jitter keep it within a few seconds.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// Storage falls behind (here: stalls): logins beyond what the store has room for are
/// told Busy instead of adding operations to its backlog, and all get in once it recovers.
#[test]
fn logins_are_shed_while_storage_is_behind() {
    const MAX_OPS: usize = 30;
    let mut w = Storm::with_config(SupernodeConfig {
        max_pending_ops: MAX_OPS,
        handshake_budget: BUDGET,
        ..SupernodeConfig::default()
    });
    w.store_paused = true;
    const N: usize = 40;
    for i in 0..N {
        w.add_client(i);
    }
    for _ in 0..200 {
        w.step();
    }
    let served = w.sn.stats().noise_reads as usize;
    // Every login queues a few storage operations; once MAX_OPS wait, no more are served.
    assert!(
        served < N,
        "all {served} logins were served with storage stalled"
    );
    assert!(w.held_ops.len() <= MAX_OPS + 3, "{} ops", w.held_ops.len());
    assert!(w.sn.stats().busy_sent > 0, "the excess was told Busy");
    w.store_paused = false;
    let start = w.now;
    while w.now < start + Duration::from_secs(30) && !w.clients.iter().all(|(_, c)| c.is_online()) {
        w.step();
    }
    assert!(
        w.clients.iter().all(|(_, c)| c.is_online()),
        "everyone got in once storage caught up"
    );
    for ev in &w.events {
        for e in ev {
            if let ClientEvent::Offline { reason } = e {
                assert!(reason.contains("busy"), "unexpected: {reason}");
            }
        }
    }
}

#[test]
fn a_queued_initiation_its_client_gave_up_on_is_shed_without_diffie_hellman() {
    let mut w = Storm::new(Limits::default());
    w.add_client(0);
    let (a, t) = {
        let (a, c) = &mut w.clients[0];
        (*a, c.poll_transmit().unwrap())
    };
    let Ok(Packet::HandshakeInit { sender, .. }) = Packet::decode(&t.payload) else {
        panic!("not an initiation");
    };
    w.sn.begin_batch();
    w.sn.handle_datagram(w.now, a, &t.payload);
    assert!(w.sn.poll_transmit().is_none(), "queued, not yet served");
    assert_eq!(w.sn.handshake_queue_len(), 1);
    assert_eq!(w.sn.poll_timeout(), Some(w.now), "queued work is due now");
    // The driver stalls past the point where the answer would reach the client too late.
    let later = w.now + Duration::from_millis(1100);
    w.sn.end_batch(later);
    let out = w.sn.poll_transmit().unwrap();
    assert_eq!(out.dst, a);
    assert!(matches!(
        Packet::decode(&out.payload),
        Ok(Packet::Reject { receiver, reason: RejectReason::Busy { retry_after_ms }, .. })
            if receiver == sender && retry_after_ms >= 250
    ));
    assert_eq!(w.sn.stats().noise_reads, 0);
    assert_eq!(w.sn.handshake_queue_len(), 0);
    // The shed initiation was never processed: the same datagram, sent again after the
    // wait, is served (not dropped as a duplicate).
    let again = later + Duration::from_millis(300);
    w.sn.handle_datagram(again, a, &t.payload);
    let out = w.sn.poll_transmit().expect("served this time");
    assert!(matches!(
        Packet::decode(&out.payload),
        Ok(Packet::HandshakeResponse { receiver, .. }) if receiver == sender
    ));
    assert_eq!(w.sn.stats().noise_reads, 1);
    assert_eq!(w.sn.stats().drops_for(DropReason::Duplicate), 0);
}

/// The client's initiation index and bytes.
fn take_init(c: &mut Client) -> (u32, Vec<u8>) {
    let t = c.poll_transmit().expect("an initiation");
    let Ok(Packet::HandshakeInit { sender, .. }) = Packet::decode(&t.payload) else {
        panic!("not an initiation");
    };
    (sender, t.payload)
}

fn busy(receiver: u32, retry_after_ms: u16) -> Vec<u8> {
    let mut b = Vec::new();
    Packet::Reject {
        receiver,
        reason: RejectReason::Busy { retry_after_ms },
        version: PROTOCOL_VERSION,
    }
    .encode(&mut b);
    b
}

#[test]
fn a_client_told_busy_waits_the_hint_plus_jitter_and_never_backs_off_for_it() {
    let mut w = Storm::new(Limits::default());
    w.add_client(0);
    let c = &mut w.clients[0].1;
    let mut now = w.now;
    let mut waits = Vec::new();
    for _ in 0..12 {
        let (index, _) = take_init(c);
        // A Busy for another handshake changes nothing.
        c.handle_datagram(now, sn_addr(), &busy(index ^ 1, 100));
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_millis(1000)));
        c.handle_datagram(now, sn_addr(), &busy(index, 2000));
        let at = c.poll_timeout().unwrap();
        let wait = at - now;
        assert!(
            wait >= Duration::from_millis(2000) && wait <= Duration::from_millis(3000),
            "{wait:?}"
        );
        waits.push(wait);
        // Nothing is sent before then.
        c.handle_timeout(at - Duration::from_millis(1));
        assert!(c.poll_transmit().is_none());
        now = at;
        c.handle_timeout(now);
    }
    // Jittered: not everyone told the same comes back at the same moment.
    waits.sort();
    waits.dedup();
    assert!(waits.len() > 6, "{waits:?}");
    // Twelve Busy answers did not count as failures: a timeout now backs off as the
    // first one does (250 ms x U[0.5, 1]), not as a twelfth (8 s).
    let _ = take_init(c);
    let timeout = now + Duration::from_millis(1000);
    c.handle_timeout(timeout);
    let retry = c.poll_timeout().unwrap() - timeout;
    assert!(retry <= Duration::from_millis(250), "{retry:?}");
    let offline: Vec<String> = std::iter::from_fn(|| c.poll_event())
        .filter_map(|e| match e {
            ClientEvent::Offline { reason } => Some(reason),
            _ => None,
        })
        .collect();
    assert!(offline.iter().filter(|r| r.contains("busy")).count() == 12);
}

#[test]
fn busy_wait_adds_up_to_half_the_hint() {
    assert_eq!(busy_wait(1000, 0), Duration::from_millis(1000));
    assert_eq!(busy_wait(1000, u32::MAX), Duration::from_millis(1500));
    let mid = busy_wait(1000, u32::MAX / 2);
    assert!(mid > Duration::from_millis(1240) && mid < Duration::from_millis(1260));
    assert_eq!(busy_wait(0, u32::MAX), Duration::ZERO);
}

mod arbitrary {
    use super::*;
    use proptest::prelude::*;

    /// One input: which datagram (a valid initiation, a corrupted one, or noise), from
    /// which source, after how many 5 ms steps (0: same batch).
    fn op() -> impl Strategy<Value = (u8, u8, u8, Vec<u8>)> {
        (
            0u8..6,
            0u8..8,
            0u8..3,
            proptest::collection::vec(any::<u8>(), 0..200),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn batches_of_anything_keep_the_queue_bounded_and_drained(
            budget in 1usize..4,
            max_queued in 0usize..6,
            wait_ms in 1u64..1500,
            ops in proptest::collection::vec(op(), 1..60),
        ) {
            let limits = Limits {
                max_queued_handshakes: max_queued,
                max_handshake_wait: Duration::from_millis(wait_ms),
                ..Limits::default()
            };
            let mut w = Storm::with_budget(limits, budget);
            let inits: Vec<Vec<u8>> = (0..4)
                .map(|i| {
                    w.add_client(i);
                    w.clients[i].1.poll_transmit().unwrap().payload
                })
                .collect();
            let mut now = w.now;
            w.sn.begin_batch();
            for (kind, src, delay, noise) in ops {
                if delay > 0 {
                    w.sn.end_batch(now);
                    now += STEP * delay as u32;
                    w.sn.handle_timeout(now);
                    w.sn.begin_batch();
                }
                let mut d = match kind {
                    0..=3 => inits[kind as usize].clone(),
                    4 => {
                        let mut d = inits[src as usize % 4].clone();
                        let at = noise.first().copied().unwrap_or(0) as usize % d.len();
                        d[at] ^= 0x5a;
                        d
                    }
                    _ => noise,
                };
                if kind == 5 && !d.is_empty() {
                    d[0] = 0x81; // look like an initiation
                }
                w.sn.handle_datagram(now, addr(src as usize), &d);
                prop_assert!(w.sn.handshake_queue_len() <= max_queued);
                while let Some(t) = w.sn.poll_transmit() {
                    if let Ok(Packet::Reject { reason: RejectReason::Busy { retry_after_ms }, .. }) =
                        Packet::decode(&t.payload)
                    {
                        prop_assert!(retry_after_ms >= 250);
                    }
                }
                while let Some((token, op)) = w.sn.poll_op() {
                    let r = execute(&mut w.store, op, &mut w.rng);
                    w.sn.handle_op_result(now, token, r);
                }
            }
            w.sn.end_batch(now);
            for _ in 0..8 {
                if w.sn.handshake_queue_len() == 0 {
                    break;
                }
                prop_assert!(w.sn.poll_timeout().is_some_and(|t| t <= now));
                w.sn.handle_timeout(now);
            }
            prop_assert_eq!(w.sn.handshake_queue_len(), 0);
            let s = w.sn.stats();
            prop_assert_eq!(s.busy_sent, s.drops_for(DropReason::Busy));
        }
    }
}

/// A user with more online contacts than a session has requests in flight (64) hears
/// about every one of them at login: the pushes beyond the window wait their turn.
#[test]
fn a_login_hears_of_every_online_contact_beyond_the_push_window() {
    use peerline_core::store::Store;
    use peerline_wire::msg::ContactState;
    const CONTACTS: usize = 200;
    let mut w = Storm::new(Limits::default());
    let me = Username::parse("new0000").unwrap();
    let accepted = Some((ContactState::Accepted, ""));
    for i in 1..=CONTACTS {
        let peer = Username::parse(&format!("new{i:04}")).unwrap();
        w.store
            .set_contact_pair(&me, accepted, &peer, accepted)
            .unwrap();
        w.add_client(i);
    }
    for _ in 0..400 {
        w.step();
        if w.clients.iter().all(|(_, c)| c.is_online()) {
            break;
        }
    }
    assert_eq!(w.sn.online_count(), CONTACTS);
    w.add_client(0);
    for _ in 0..2000 {
        w.step();
    }
    let me_index = CONTACTS;
    assert!(w.clients[me_index].1.is_online());
    let heard: std::collections::BTreeSet<Username> = w.events[me_index]
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Presence { user, presence } if *presence == Presence::Online => {
                Some(user.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(heard.len(), CONTACTS, "heard of {} contacts", heard.len());
    assert_eq!(w.sn.stats().pushes_dropped, 0);
}

/// After a full receive batch (more datagrams waiting in the socket) the supernode serves
/// only a few handshakes, so that reading keeps up; after a partial one, its full budget.
#[test]
fn a_backlogged_socket_gets_fewer_handshakes_per_batch() {
    use peerline_core::supernode::BACKLOG_HANDSHAKE_BUDGET;
    let mut w = Storm::with_budget(Limits::default(), 16);
    for i in 0..40 {
        w.add_client(i);
    }
    let inits: Vec<(SocketAddr, Vec<u8>)> = w
        .clients
        .iter_mut()
        .map(|(a, c)| (*a, c.poll_transmit().unwrap().payload))
        .collect();
    w.sn.begin_batch();
    for (a, p) in &inits {
        w.sn.handle_datagram(w.now, *a, p);
    }
    w.sn.end_batch_backlogged(w.now);
    assert_eq!(w.sn.stats().noise_reads, BACKLOG_HANDSHAKE_BUDGET as u64);
    w.sn.begin_batch();
    w.sn.end_batch(w.now);
    assert_eq!(
        w.sn.stats().noise_reads,
        BACKLOG_HANDSHAKE_BUDGET as u64 + 16
    );
}
