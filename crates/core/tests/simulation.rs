//! Deterministic multi-node simulations: one supernode, several clients, a seeded network
//! with loss, duplication and reordering, and virtual time. No sockets, no sleeping.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use peerline_core::client::{Client, ClientConfig, ClientEvent, Command, CommandResult, Via};
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::link::Transmit;
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::relay::{AllocationId, Relay, RelayConfig, RelayEvent, RelaySocket};
use peerline_core::sim::{NatKind, Net};
use peerline_core::supernode::{RelayOffer, Supernode, SupernodeConfig};
use peerline_crypto::{Authority, DeviceKeys};
use peerline_wire::msg::{ContactAction, ContactState, ErrorCode, Presence};
use peerline_wire::Username;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const UNIX_START_MS: u64 = 1_790_000_000_000;

/// Extra sockets a client opens for the birthday technique (the default).
const BIRTHDAY_SOCKETS: usize = 256;

/// The address of a client's extra socket `k`: the next ports after its main one.
fn extra_addr(main: SocketAddr, k: usize) -> SocketAddr {
    SocketAddr::new(main.ip(), main.port() + 1 + k as u16)
}

fn sn_addr() -> SocketAddr {
    "203.0.113.1:7000".parse().unwrap()
}

fn relay_addr() -> SocketAddr {
    "203.0.113.2:3478".parse().unwrap()
}

mod support;
use support::{user, Sim};

struct World {
    now: Instant,
    t0: Instant,
    net: Net,
    sn: Supernode,
    sn_keys: DeviceKeys,
    authority_bytes: [u8; 32],
    store: MemoryStore,
    rng: ChaCha20Rng,
    clients: Vec<(SocketAddr, Client)>,
    events: Vec<Vec<ClientEvent>>,
    sn_datagrams: u64,
    /// Clients that are frozen (a stopped process): not stepped, their datagrams lost.
    frozen: Vec<usize>,
    /// Every datagram the supernode received, with its source.
    sn_log: Vec<(SocketAddr, Vec<u8>)>,
    /// (source, destination) of every datagram delivered to a client.
    client_log: Vec<(SocketAddr, SocketAddr)>,
    /// (client, extra socket) of every datagram delivered to an extra socket.
    extra_log: Vec<(usize, usize)>,
    /// The TURN relay, in worlds that have one.
    relay: Option<Relay>,
    /// Relayed addresses handed out by the relay.
    allocations: Vec<(AllocationId, SocketAddr)>,
}

impl Sim for World {
    fn step(&mut self) {
        World::step(self)
    }
    fn now(&self) -> Instant {
        self.now
    }
    fn client_mut(&mut self, i: usize) -> &mut Client {
        &mut self.clients[i].1
    }
    fn events(&self, i: usize) -> &[ClientEvent] {
        &self.events[i]
    }
}

impl World {
    fn new(seed: u64, net: Net) -> Self {
        Self::with_config(seed, net, SupernodeConfig::default())
    }

    fn with_config(seed: u64, net: Net, cfg: SupernodeConfig) -> Self {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let authority = Authority::generate(&mut rng);
        let authority_bytes = authority.to_bytes();
        let sn = Self::make_supernode(cfg, &sn_keys, &authority_bytes, seed, t0);
        World {
            now: t0,
            t0,
            net,
            sn,
            sn_keys,
            authority_bytes,
            store: MemoryStore::new(),
            rng,
            clients: Vec::new(),
            events: Vec::new(),
            sn_datagrams: 0,
            frozen: Vec::new(),
            sn_log: Vec::new(),
            client_log: Vec::new(),
            extra_log: Vec::new(),
            relay: None,
            allocations: Vec::new(),
        }
    }

    /// A world whose supernode offers a TURN relay at [`relay_addr`].
    fn with_relay(seed: u64, net: Net) -> Self {
        Self::with_relay_credentials(seed, net, Duration::from_secs(24 * 3600))
    }

    /// As [`World::with_relay`], with relay credentials valid for `lifetime`.
    fn with_relay_credentials(seed: u64, net: Net, lifetime: Duration) -> Self {
        let secret = [0x5a; 32];
        let cfg = SupernodeConfig {
            relay: Some(RelayOffer {
                server: relay_addr(),
                secret,
                lifetime,
            }),
            ..SupernodeConfig::default()
        };
        let mut w = Self::with_config(seed, net, cfg);
        w.relay = Some(Relay::new(
            RelayConfig::default(),
            secret,
            [seed as u8; 32],
            w.now,
            UNIX_START_MS / 1000,
        ));
        w
    }

    /// Runs the relay: client messages, peer datagrams to relayed addresses, timers.
    fn step_relay(&mut self, now: Instant, inbound: Vec<(SocketAddr, Transmit)>) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        for (from, t) in inbound {
            if t.dst == relay_addr() {
                relay.handle_client(now, from, &t.payload);
            } else {
                let id = self
                    .allocations
                    .iter()
                    .find(|(_, a)| *a == t.dst)
                    .map(|(id, _)| *id);
                if let Some(id) = id {
                    relay.handle_peer(now, id, from, &t.payload);
                }
            }
        }
        if relay.poll_timeout().is_some_and(|t| t <= now) {
            relay.handle_timeout(now);
        }
        while let Some(e) = relay.poll_event() {
            if let RelayEvent::AllocationCreated { id, .. } = e {
                let addr = SocketAddr::new(relay_addr().ip(), 50_000 + id.get() as u16);
                self.allocations.push((id, addr));
                relay.relayed_bound(now, id, addr);
            }
        }
        while let Some(t) = relay.poll_transmit() {
            let src = match t.socket {
                RelaySocket::Listen => relay_addr(),
                RelaySocket::Relayed(id) => match self.allocations.iter().find(|(i, _)| *i == id) {
                    Some((_, a)) => *a,
                    None => continue,
                },
            };
            self.net.send(
                now,
                src,
                Transmit {
                    dst: t.dst,
                    payload: t.payload,
                },
            );
        }
    }

    fn make_supernode(
        cfg: SupernodeConfig,
        keys: &DeviceKeys,
        authority: &[u8; 32],
        seed: u64,
        now: Instant,
    ) -> Supernode {
        Supernode::new(
            cfg,
            keys.noise_private(),
            Authority::from_bytes(authority),
            [seed as u8; 32],
            Box::new(MemoryDirectory::new()),
            WallClock::new(now, UNIX_START_MS),
            now,
        )
    }

    /// Simulates a crash: all in-memory state is lost, the store survives.
    fn restart_supernode(&mut self) {
        let snapshot = self.sn.snapshot();
        let clock_at = self.now;
        let elapsed = self.now.duration_since(self.t0).as_millis() as u64;
        let mut sn = Supernode::new(
            SupernodeConfig::default(),
            self.sn_keys.noise_private(),
            Authority::from_bytes(&self.authority_bytes),
            [99; 32],
            Box::new(MemoryDirectory::new()),
            WallClock::new(clock_at, UNIX_START_MS + elapsed),
            self.now,
        );
        for (index, addr) in snapshot {
            sn.send_reset_hint(index, addr);
        }
        self.sn = sn;
    }

    fn add_client(&mut self, cert: Option<Vec<u8>>, keys: Option<DeviceKeys>) -> usize {
        let i = self.clients.len();
        let addr: SocketAddr = format!("198.51.100.{}:{}", i + 10, 5000 + i)
            .parse()
            .unwrap();
        self.add_client_at(addr, cert, keys)
    }

    /// A new client behind a fresh NAT of `kind` (or on a public address for `None`).
    fn add_client_behind(&mut self, kind: Option<NatKind>) -> usize {
        let i = self.clients.len();
        match kind {
            None => self.add_client(None, None),
            Some(kind) => {
                let private: SocketAddr = format!("10.{}.0.2:5000", i + 1).parse().unwrap();
                let public: IpAddr = format!("192.0.2.{}", i + 1).parse().unwrap();
                let nat = self.net.add_nat(kind, public);
                self.net.place_behind(private, nat);
                for k in 0..BIRTHDAY_SOCKETS {
                    self.net.place_behind(extra_addr(private, k), nat);
                }
                self.add_client_at(private, None, None)
            }
        }
    }

    fn add_client_at(
        &mut self,
        addr: SocketAddr,
        cert: Option<Vec<u8>>,
        keys: Option<DeviceKeys>,
    ) -> usize {
        let i = self.clients.len();
        let keys = keys.unwrap_or_else(|| DeviceKeys::generate(&mut self.rng));
        let cfg = ClientConfig::new(
            sn_addr(),
            self.sn_keys.noise_public(),
            Authority::from_bytes(&self.authority_bytes).public(),
        );
        let elapsed = self.now.duration_since(self.t0).as_millis() as u64;
        let mut c = Client::new(
            cfg,
            keys,
            cert.as_deref(),
            [i as u8 + 1; 32],
            WallClock::new(self.now, UNIX_START_MS + elapsed),
            self.now,
        );
        c.set_local_candidates(vec![addr]);
        c.connect(self.now);
        self.clients.push((addr, c));
        self.events.push(Vec::new());
        i
    }

    fn step(&mut self) {
        let now = self.now;
        // Supernode: storage ops run synchronously here.
        while let Some((token, op)) = self.sn.poll_op() {
            let r = execute(&mut self.store, op, &mut self.rng);
            self.sn.handle_op_result(now, token, r);
        }
        while let Some(t) = self.sn.poll_transmit() {
            self.net.send(now, sn_addr(), t);
        }
        for (i, (addr, c)) in self.clients.iter_mut().enumerate() {
            if self.frozen.contains(&i) {
                continue;
            }
            while let Some(t) = c.poll_transmit() {
                self.net.send(now, *addr, t);
            }
            while let Some((k, t)) = c.poll_extra_transmit() {
                assert!(k < c.extra_sockets(), "sent from a socket the driver holds");
                self.net.send(now, extra_addr(*addr, k), t);
            }
            while let Some(e) = c.poll_event() {
                if let ClientEvent::Message { token, .. } = &e {
                    c.message_saved(now, *token);
                }
                self.events[i].push(e);
            }
            while let Some(t) = c.poll_transmit() {
                self.net.send(now, *addr, t);
            }
        }
        let delivered = self.net.deliver(now);
        let (to_relay, delivered): (Vec<_>, Vec<_>) = delivered
            .into_iter()
            .partition(|(_, t)| t.dst.ip() == relay_addr().ip());
        self.step_relay(now, to_relay);
        for (from, Transmit { dst, payload }) in delivered {
            if dst == sn_addr() {
                self.sn_datagrams += 1;
                self.sn_log.push((from, payload.clone()));
                self.sn.handle_datagram(now, from, &payload);
            } else if let Some(i) = self.clients.iter().position(|(a, _)| *a == dst) {
                self.client_log.push((from, dst));
                if !self.frozen.contains(&i) {
                    self.clients[i].1.handle_datagram(now, from, &payload);
                }
            } else if let Some((i, k)) = self.clients.iter().enumerate().find_map(|(i, (a, c))| {
                (0..c.extra_sockets())
                    .find(|k| extra_addr(*a, *k) == dst)
                    .map(|k| (i, k))
            }) {
                self.client_log.push((from, dst));
                self.extra_log.push((i, k));
                if !self.frozen.contains(&i) {
                    self.clients[i]
                        .1
                        .handle_extra_datagram(now, k, from, &payload);
                }
            }
        }
        self.now += Duration::from_millis(5);
        let now = self.now;
        if self.sn.poll_timeout().is_some_and(|t| t <= now) {
            self.sn.handle_timeout(now);
        }
        for (i, (_, c)) in self.clients.iter_mut().enumerate() {
            if self.frozen.contains(&i) {
                continue;
            }
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
    }

    /// Sources of every datagram delivered to the client at `addr`.
    fn delivered_to(&self, addr: SocketAddr) -> Vec<SocketAddr> {
        self.client_log
            .iter()
            .filter(|(_, d)| *d == addr)
            .map(|(f, _)| *f)
            .collect()
    }

    /// Stops client `i` cleanly (its session closes) and removes it; returns its
    /// certificate so the same device can come back later.
    fn take_offline(&mut self, i: usize) -> Vec<u8> {
        let cert = self.clients[i].1.certificate().unwrap().to_bytes();
        let now = self.now;
        self.clients[i].1.shutdown(now);
        self.step();
        self.clients.remove(i);
        self.events.remove(i);
        cert
    }

    /// Client `i` sends `text` to `to`; returns how the command ended.
    fn send(&mut self, i: usize, to: &str, text: impl AsRef<str>) -> CommandResult {
        let text = text.as_ref().to_string();
        self.command(i, Command::SendMessage { to: user(to), text })
    }

    fn messages(&self, i: usize) -> Vec<(Username, String, Via)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Message {
                    from, text, via, ..
                } => Some((from.clone(), text.clone(), *via)),
                _ => None,
            })
            .collect()
    }
}

fn sent_via(r: &CommandResult) -> Via {
    match r {
        CommandResult::Sent { via, .. } => *via,
        other => panic!("not sent: {other:?}"),
    }
}

fn full_scenario(w: &mut World) {
    let (a, b, c) = (
        w.add_client(None, None),
        w.add_client(None, None),
        w.add_client(None, None),
    );
    w.register(a, "alice");
    w.register(b, "bob");
    w.register(c, "carol");

    // Usernames are case-insensitive and unique.
    let d = w.add_client(None, None);
    match w.command(
        d,
        Command::Register {
            username: user("ALICE"),
            password: "another one".into(),
        },
    ) {
        CommandResult::Error {
            code: ErrorCode::UsernameTaken,
            ..
        } => {}
        other => panic!("expected UsernameTaken, got {other:?}"),
    }

    // Contact request, then accept; the requester hears about it.
    assert_eq!(
        w.command(
            a,
            Command::ContactAdd {
                user: user("bob"),
                note: "it's alice".into()
            }
        ),
        CommandResult::Ok
    );
    assert!(w.saw(b, |e| matches!(e, ClientEvent::Contact { user: u, state: ContactState::Incoming, note } if u.as_str() == "alice" && note == "it's alice")));
    // Not yet accepted: no messaging.
    match w.send(a, "bob", "too early") {
        CommandResult::Error {
            code: ErrorCode::NotContact,
            ..
        } => {}
        other => panic!("expected NotContact, got {other:?}"),
    }
    assert_eq!(
        w.command(
            b,
            Command::ContactReply {
                user: user("alice"),
                action: ContactAction::Accept
            }
        ),
        CommandResult::Ok
    );
    assert!(w.saw(a, |e| matches!(e, ClientEvent::Contact { user: u, state: ContactState::Accepted, .. } if u.as_str() == "bob")));
    // Presence of a new contact is pushed.
    assert!(w.saw(a, |e| matches!(e, ClientEvent::Presence { user: u, presence: Presence::Online } if u.as_str() == "bob")));

    // Online message goes direct.
    let r = w.send(a, "bob", "hello bob");
    assert_eq!(
        sent_via(&r),
        Via::Direct,
        "alice events: {:#?}",
        w.events[a]
    );
    assert!(w
        .messages(b)
        .contains(&(user("alice"), "hello bob".into(), Via::Direct)));
    // And back, over the same session.
    let r = w.send(b, "alice", "hi alice");
    assert_eq!(sent_via(&r), Via::Direct);
    assert!(w
        .messages(a)
        .contains(&(user("bob"), "hi alice".into(), Via::Direct)));

    // A non-contact is refused with a reason and nothing is delivered.
    match w.send(c, "alice", "spam") {
        CommandResult::Error {
            code: ErrorCode::NotContact,
            detail,
        } => assert!(detail.contains("alice")),
        other => panic!("expected NotContact, got {other:?}"),
    }
    // Unknown user is named in the error.
    match w.send(a, "nobody", "x") {
        CommandResult::Error {
            code: ErrorCode::UnknownUser,
            detail,
        } => assert!(detail.contains("nobody")),
        other => panic!("expected UnknownUser, got {other:?}"),
    }
    w.run_for(Duration::from_secs(1));
    assert!(!w.messages(a).iter().any(|(_, t, _)| t == "spam"));

    // Presence goes to contacts only.
    assert_eq!(
        w.command(b, Command::SetPresence(Presence::Busy)),
        CommandResult::Ok
    );
    assert!(w.saw(a, |e| matches!(e, ClientEvent::Presence { user: u, presence: Presence::Busy } if u.as_str() == "bob")));
    assert!(!w.events[c]
        .iter()
        .any(|e| matches!(e, ClientEvent::Presence { .. })));

    // Search by prefix: names only.
    match w.command(
        c,
        Command::Search {
            prefix: "BO".into(),
        },
    ) {
        CommandResult::Users(u) => assert_eq!(u, vec![user("bob")]),
        other => panic!("{other:?}"),
    }

    // Contact list carries states and presence.
    match w.command(a, Command::ContactList) {
        CommandResult::Contacts(e) => {
            assert_eq!(e.len(), 1);
            assert_eq!(e[0].user, user("bob"));
            assert_eq!(e[0].state, ContactState::Accepted);
            assert_eq!(e[0].presence, Presence::Busy);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn full_flow_on_a_perfect_network() {
    let mut w = World::new(1, Net::perfect(1));
    full_scenario(&mut w);
}

#[test]
fn full_flow_under_loss_duplication_and_reordering() {
    for seed in 0..4 {
        let mut w = World::new(seed, Net::lossy(seed, 0.1, 0.1, Duration::from_millis(40)));
        full_scenario(&mut w);
    }
}

impl World {
    fn store_pending(&mut self, to: &str) -> usize {
        use peerline_core::store::Store;
        self.store.pending_messages(&user(to), 100).unwrap().len()
    }
}

#[test]
fn offline_delivery_on_next_login() {
    let mut w = World::new(4, Net::perfect(4));
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let bob_keys = DeviceKeys::generate(&mut rng);
    let (a, b) = (
        w.add_client(None, None),
        w.add_client(None, Some(bob_keys.clone())),
    );
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    let bob_cert = w.take_offline(b);
    w.run_for(Duration::from_millis(200));
    let r = w.send(a, "bob", "see you");
    assert_eq!(sent_via(&r), Via::Offline);
    assert_eq!(w.store_pending("bob"), 1);

    let b2 = w.add_client(Some(bob_cert), Some(bob_keys));
    w.run_for(Duration::from_secs(2));
    assert!(w.clients[b2].1.is_online());
    assert_eq!(
        w.messages(b2),
        vec![(user("alice"), "see you".to_string(), Via::Offline)]
    );
    // Acknowledged by the client, so deleted from the store.
    assert_eq!(w.store_pending("bob"), 0);
}

#[test]
fn clients_reconnect_by_themselves_after_a_supernode_crash() {
    let mut w = World::new(5, Net::perfect(5));
    let (a, b) = (w.add_client(None, None), w.add_client(None, None));
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    w.restart_supernode();
    // The restarted supernode's hints bring both back well within 10 s.
    w.run_for(Duration::from_secs(5));
    assert!(w.clients[a].1.is_online() && w.clients[b].1.is_online());
    assert!(w.events[a]
        .iter()
        .any(|e| matches!(e, ClientEvent::Offline { .. })));
    let r = w.send(a, "bob", "after the crash");
    assert!(matches!(sent_via(&r), Via::Direct));
}

#[test]
fn reconnect_without_hints_through_keepalive_reset() {
    let mut w = World::new(6, Net::perfect(6));
    let a = w.add_client(None, None);
    w.register(a, "alice");
    // A crash with no snapshot: the next keepalive hits an unknown index and is reset.
    let elapsed = w.now.duration_since(w.t0).as_millis() as u64;
    w.sn = Supernode::new(
        SupernodeConfig::default(),
        w.sn_keys.noise_private(),
        Authority::from_bytes(&w.authority_bytes),
        [7; 32],
        Box::new(MemoryDirectory::new()),
        WallClock::new(w.now, UNIX_START_MS + elapsed),
        w.now,
    );
    w.run_for(Duration::from_secs(30));
    assert!(w.clients[a].1.is_online());
    assert_eq!(w.sn.online_count(), 1);
}

#[test]
fn idle_session_costs_only_keepalives() {
    let mut w = World::new(8, Net::perfect(8));
    let (a, b) = (w.add_client(None, None), w.add_client(None, None));
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    w.run_for(Duration::from_secs(1));
    let before = w.sn_datagrams;
    w.run_for(Duration::from_secs(100));
    let per_client = (w.sn_datagrams - before) as f64 / 2.0;
    // 100 s / 25 s keepalive = 4 per client.
    assert!(
        per_client <= 5.0,
        "supernode received {per_client} datagrams per idle client in 100 s"
    );
    assert!(w.clients[a].1.is_online());
}

fn short_lived() -> SupernodeConfig {
    SupernodeConfig {
        cert_lifetime: Duration::from_secs(120),
        ..SupernodeConfig::default()
    }
}

fn cert_count(w: &World, i: usize) -> usize {
    w.events[i]
        .iter()
        .filter(|e| matches!(e, ClientEvent::Certificate(_)))
        .count()
}

#[test]
fn certificate_is_renewed_while_online() {
    let mut w = World::with_config(9, Net::perfect(9), short_lived());
    let a = w.add_client(None, None);
    w.register(a, "alice");
    let first = w.clients[a].1.certificate().unwrap().repr().not_after;
    // Well past the first certificate's expiry (and the verifier's clock-skew allowance).
    w.run_for(Duration::from_secs(600));
    assert!(
        cert_count(&w, a) >= 3,
        "renewed {} times",
        cert_count(&w, a) - 1
    );
    let now_s = (UNIX_START_MS + w.now.duration_since(w.t0).as_millis() as u64) / 1000;
    let cert = w.clients[a].1.certificate().unwrap();
    assert!(cert.repr().not_after > first);
    assert!(
        cert.check_time(now_s).is_ok(),
        "current certificate is valid"
    );
    assert!(w.clients[a].1.is_online());
}

#[test]
fn expired_certificate_is_renewed_at_login() {
    let mut w = World::with_config(10, Net::perfect(10), short_lived());
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let keys = DeviceKeys::generate(&mut rng);
    let b = w.add_client(None, Some(keys.clone()));
    w.register(b, "bob");
    let old = w.take_offline(b);
    // Offline far longer than the certificate lives.
    w.run_for(Duration::from_secs(900));
    let b2 = w.add_client(Some(old.clone()), Some(keys));
    w.run_for(Duration::from_secs(3));
    assert!(
        w.clients[b2].1.is_online(),
        "logged in with a renewed certificate"
    );
    assert_eq!(cert_count(&w, b2), 1);
    assert_ne!(w.clients[b2].1.certificate().unwrap().to_bytes(), old);
}

#[test]
fn a_revoked_or_unknown_device_cannot_log_in_with_an_expired_certificate() {
    use peerline_core::store::Store;
    let mut w = World::with_config(11, Net::perfect(11), short_lived());
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let keys = DeviceKeys::generate(&mut rng);
    let b = w.add_client(None, Some(keys.clone()));
    w.register(b, "bob");
    let old = w.take_offline(b);
    w.store.revoke_device(&keys.noise_public()).unwrap();
    w.run_for(Duration::from_secs(900));
    let b2 = w.add_client(Some(old), Some(keys));
    w.run_for(Duration::from_secs(3));
    assert!(!w.clients[b2].1.is_online());
    assert_eq!(w.sn.online_count(), 0);
    assert!(w.events[b2]
        .iter()
        .any(|e| matches!(e, ClientEvent::Offline { reason } if reason.contains("revoked"))));
}

fn offline_events(w: &World, i: usize) -> usize {
    w.events[i]
        .iter()
        .filter(|e| matches!(e, ClientEvent::Offline { .. }))
        .count()
}

#[test]
fn an_unresponsive_contact_costs_a_mailbox_fallback_not_a_reconnection() {
    let mut w = World::new(12, Net::perfect(12));
    let (a, b) = (w.add_client(None, None), w.add_client(None, None));
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    // Bob's process stops (SIGSTOP): his session still looks alive to the supernode.
    w.frozen.push(b);
    let id = w.clients[a].1.command(
        w.now,
        Command::SendMessage {
            to: user("bob"),
            text: "are you there?".into(),
        },
    );
    let r = w.wait_done(a, id, Duration::from_secs(8));
    assert_eq!(sent_via(&r), Via::Offline);
    assert_eq!(offline_events(&w, a), 0, "alice did not lose her supernode");
    // Not stuck: the next message takes the same way.
    let r = w.send(a, "bob", "still there?");
    assert_eq!(sent_via(&r), Via::Offline);
    // Bob resumes and gets both.
    w.frozen.clear();
    assert!(w.saw_message(b, "still there?"));
    assert!(w.saw_message(b, "are you there?"));
    // Frozen long enough that the delivery itself gives up: the message stays in the
    // mailbox and goes out once bob is heard from again.
    w.frozen.push(b);
    let r = w.send(a, "bob", "third try");
    assert_eq!(sent_via(&r), Via::Offline);
    w.run_for(Duration::from_secs(20));
    w.frozen.clear();
    w.run_for(Duration::from_secs(30));
    assert!(w.messages(b).iter().any(|(_, t, _)| t == "third try"));
    assert_eq!(w.store_pending("bob"), 0);
}

#[test]
fn a_second_device_takes_over_without_a_tug_of_war() {
    let mut w = World::new(13, Net::perfect(13));
    let a = w.add_client(None, None);
    w.register(a, "alice");
    let a2 = w.add_client(None, None);
    let r = w.command(
        a2,
        Command::Enroll {
            username: user("alice"),
            password: "correct horse".into(),
        },
    );
    assert_eq!(r, CommandResult::Ok);
    w.run_for(Duration::from_secs(20));
    assert!(w.clients[a2].1.is_online());
    assert!(!w.clients[a].1.is_online(), "the first device stays off");
    assert!(w.events[a].iter().any(
        |e| matches!(e, ClientEvent::Offline { reason } if reason.contains("another device"))
    ));
    assert_eq!(w.sn.stats().logins, 2, "no login ping-pong");
    // The user acts on the first device again: it takes the account back.
    let r = w.command(a, Command::SetPresence(Presence::Away));
    assert_eq!(r, CommandResult::Ok);
    assert!(w.clients[a].1.is_online());
}

#[test]
fn a_replayed_login_handshake_does_not_evict_the_user() {
    use peerline_wire::packet::Packet;
    let mut w = World::new(14, Net::perfect(14));
    let a = w.add_client(None, None);
    w.register(a, "alice");
    // Alice reconnects (a crash of the supernode), logging in with a certificate.
    w.restart_supernode();
    w.run_for(Duration::from_secs(3));
    assert!(w.clients[a].1.is_online());
    let captured: Vec<Vec<u8>> = w
        .sn_log
        .iter()
        .filter(|(_, p)| matches!(Packet::decode(p), Ok(Packet::HandshakeInit { .. })))
        .map(|(_, p)| p.clone())
        .collect();
    assert!(captured.len() >= 2);
    // After another crash the duplicate filter is empty; alice logs in again, then an
    // attacker replays her earlier login from elsewhere.
    w.restart_supernode();
    w.run_for(Duration::from_secs(3));
    let logins = w.sn.stats().logins;
    let dropped = w.sn.stats().dropped;
    let offline_before = offline_events(&w, a);
    let attacker: SocketAddr = "192.0.2.66:4444".parse().unwrap();
    for p in &captured {
        let now = w.now;
        w.sn.handle_datagram(now, attacker, p);
    }
    w.run_for(Duration::from_secs(3));
    assert_eq!(w.sn.stats().logins, logins, "no replayed login succeeded");
    assert!(
        w.sn.stats().dropped > dropped,
        "the replayed logins were dropped"
    );
    assert_eq!(
        offline_events(&w, a),
        offline_before,
        "alice kept her session"
    );
    assert!(w.clients[a].1.is_online());
}

#[test]
fn an_invisible_user_gets_messages_but_gives_out_no_address() {
    let mut w = World::new(15, Net::perfect(15));
    let (a, b) = (w.add_client(None, None), w.add_client(None, None));
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    assert_eq!(
        w.command(b, Command::SetPresence(Presence::Invisible)),
        CommandResult::Ok
    );
    assert!(w.saw(a, |e| matches!(e, ClientEvent::Presence { user: u, presence: Presence::Offline } if u.as_str() == "bob")));
    let r = w.send(a, "bob", "psst");
    assert_eq!(sent_via(&r), Via::Offline);
    assert!(w.saw_message(b, "psst"));
    assert!(
        w.clients[a].1.direct_peers().is_empty(),
        "no direct session, so no address exchanged"
    );
    assert!(w.clients[b].1.direct_peers().is_empty());
}

/// Two users behind every pair of NAT kinds: the path their messages take. With hole
/// punching (probes from the callee, peer-reflexive candidates at the caller), every pair
/// connects directly except where both mappings cannot be predicted: symmetric with
/// symmetric or with port-restricted falls back to the mailbox until the birthday
/// technique and the relay exist.
#[test]
fn nat_matrix_direct_wherever_hole_punching_can_work() {
    use NatKind::*;
    let kinds = [
        None,
        Some(FullCone),
        Some(Restricted),
        Some(PortRestricted),
        Some(Symmetric),
    ];
    let name = |k: Option<NatKind>| k.map_or("public".to_string(), |k| format!("{k:?}"));
    let mut failures = Vec::new();
    for (x, ka) in kinds.iter().enumerate() {
        for kb in kinds.iter().skip(x) {
            let mut w = World::new(40 + x as u64, Net::perfect(40));
            let a = w.add_client_behind(*ka);
            let b = w.add_client_behind(*kb);
            w.register(a, "alice");
            w.register(b, "bob");
            w.befriend(a, b, "bob", "alice");
            let r = w.send(a, "bob", "hi");
            let got = sent_via(&r);
            let hard = |k: &Option<NatKind>| *k == Some(Symmetric);
            let port_dependent =
                |k: &Option<NatKind>| matches!(k, Some(Symmetric) | Some(PortRestricted));
            let expect = if (hard(ka) && port_dependent(kb)) || (hard(kb) && port_dependent(ka)) {
                Via::Offline
            } else {
                Via::Direct
            };
            if got != expect {
                failures.push(format!(
                    "{} -> {}: {:?}, expected {:?}",
                    name(*ka),
                    name(*kb),
                    got,
                    expect
                ));
            }
            assert!(w.saw_message(b, "hi"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn two_users_behind_one_nat_connect_over_local_addresses() {
    let mut w = World::new(60, Net::perfect(60));
    let public: IpAddr = "192.0.2.200".parse().unwrap();
    let nat = w.net.add_nat(NatKind::Symmetric, public);
    let (pa, pb): (SocketAddr, SocketAddr) = (
        "10.9.0.2:5000".parse().unwrap(),
        "10.9.0.3:5000".parse().unwrap(),
    );
    w.net.place_behind(pa, nat);
    w.net.place_behind(pb, nat);
    let a = w.add_client_at(pa, None, None);
    let b = w.add_client_at(pb, None, None);
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    let r = w.send(a, "bob", "next door");
    assert_eq!(sent_via(&r), Via::Direct);
}

impl World {
    /// A relay-only client behind a fresh full-cone NAT (the easiest NAT to reach, so any
    /// leak of its address would show).
    fn add_relay_only_client(&mut self) -> usize {
        let i = self.add_client_behind(Some(NatKind::FullCone));
        let addr = self.clients[i].0;
        let keys = DeviceKeys::generate(&mut ChaCha20Rng::seed_from_u64(71));
        let mut cfg = ClientConfig::new(
            sn_addr(),
            self.sn_keys.noise_public(),
            Authority::from_bytes(&self.authority_bytes).public(),
        );
        cfg.relay_only = true;
        let elapsed = self.now.duration_since(self.t0).as_millis() as u64;
        let mut c = Client::new(
            cfg,
            keys,
            None,
            [33; 32],
            WallClock::new(self.now, UNIX_START_MS + elapsed),
            self.now,
        );
        c.set_local_candidates(vec![addr]);
        c.connect(self.now);
        self.clients[i].1 = c;
        i
    }

    /// Whether the client at `to` ever received a datagram from an address with `ip`.
    fn heard_from_ip(&self, to: SocketAddr, ip: IpAddr) -> bool {
        self.delivered_to(to).iter().any(|from| from.ip() == ip)
    }
}

/// Relay-only mode without a relay: the user's addresses never reach a peer; nothing from
/// either side's address arrives at the other, in both directions of messaging, and
/// messages still arrive through the supernode's mailbox.
#[test]
fn a_relay_only_users_addresses_never_reach_the_peer() {
    for relay_only_is_caller in [true, false] {
        let mut w = World::new(70, Net::perfect(70));
        let private = w.add_relay_only_client();
        let other = w.add_client(None, None);
        let addr = w.clients[private].0;
        w.register(private, "paula");
        w.register(other, "oscar");
        w.befriend(private, other, "oscar", "paula");
        let (from, to, fname, tname) = if relay_only_is_caller {
            (private, other, "paula", "oscar")
        } else {
            (other, private, "oscar", "paula")
        };
        let r = w.send(from, tname, "hello");
        assert_eq!(sent_via(&r), Via::Offline);
        assert!(w.saw(to, |e| matches!(e, ClientEvent::Message { text, from: f, .. } if text == "hello" && f.as_str() == fname)));
        w.run_for(Duration::from_secs(5));
        let other_addr = w.clients[other].0;
        assert!(w.clients[other].1.direct_peers().is_empty());
        assert!(
            !w.delivered_to(other_addr)
                .iter()
                .any(|from| *from != sn_addr()),
            "oscar received datagrams from someone other than the supernode"
        );
        assert!(
            !w.delivered_to(addr).iter().any(|from| *from != sn_addr()),
            "paula received datagrams from someone other than the supernode"
        );
    }
}

/// Relay-only mode with the operator's relay: a real peer session, always through the
/// relay, and still nothing the peer receives comes from the relay-only user's addresses
/// (private or public), whichever side starts.
#[test]
fn a_relay_only_user_talks_through_the_relay_without_revealing_an_address() {
    for relay_only_is_caller in [true, false] {
        let mut w = World::with_relay(72, Net::perfect(72));
        let private = w.add_relay_only_client();
        let other = w.add_client(None, None);
        let paula_private = w.clients[private].0;
        let paula_public: IpAddr = format!("192.0.2.{}", private + 1).parse().unwrap();
        w.register(private, "paula");
        w.register(other, "oscar");
        w.befriend(private, other, "oscar", "paula");
        w.run_for(Duration::from_millis(500));
        assert!(w.clients[private].1.relayed_address().is_some());
        let (from, to, fname, tname) = if relay_only_is_caller {
            (private, other, "paula", "oscar")
        } else {
            (other, private, "oscar", "paula")
        };
        let r = w.send(from, tname, "hello");
        assert_eq!(
            sent_via(&r),
            Via::Relay,
            "relay-only caller: {relay_only_is_caller}"
        );
        assert!(w.saw(to, |e| matches!(e, ClientEvent::Message { text, from: f, via: Via::Relay, .. } if text == "hello" && f.as_str() == fname)));
        let r = w.send(to, fname, "and back");
        assert_eq!(sent_via(&r), Via::Relay);
        w.run_for(Duration::from_secs(3));
        let oscar = w.clients[other].0;
        assert!(
            !w.heard_from_ip(oscar, paula_private.ip()),
            "oscar heard from paula's private address"
        );
        assert!(
            !w.heard_from_ip(oscar, paula_public),
            "oscar heard from paula's public address"
        );
    }
}

/// With the operator's relay, pairs that hole punching cannot connect get a peer session
/// through the relay (still end-to-end encrypted), and the rest stay direct.
#[test]
fn hard_nat_pairs_connect_through_the_relay() {
    use NatKind::*;
    let cases = [
        (Some(Symmetric), Some(Symmetric), Via::Relay),
        // One hard side: the birthday technique finds a direct path.
        (Some(Symmetric), Some(PortRestricted), Via::Direct),
        (Some(PortRestricted), Some(Symmetric), Via::Direct),
        (Some(PortRestricted), Some(PortRestricted), Via::Direct),
        (None, Some(Symmetric), Via::Direct),
    ];
    let mut failures = Vec::new();
    for (i, (ka, kb, expect)) in cases.iter().enumerate() {
        let mut w = World::with_relay(80 + i as u64, Net::perfect(80));
        let a = w.add_client_behind(*ka);
        let b = w.add_client_behind(*kb);
        w.register(a, "alice");
        w.register(b, "bob");
        w.befriend(a, b, "bob", "alice");
        w.run_for(Duration::from_millis(500)); // relay allocations complete
        assert!(
            w.clients[a].1.relayed_address().is_some(),
            "alice got a relay allocation"
        );
        let r = w.send(a, "bob", "hi");
        let got = sent_via(&r);
        if got != *expect {
            failures.push(format!("{ka:?} -> {kb:?}: {got:?}, expected {expect:?}"));
        }
        assert!(w.saw_message(b, "hi"));
        // And back over the same session.
        let r = w.send(b, "alice", "hi back");
        assert_ne!(
            sent_via(&r),
            Via::Offline,
            "{ka:?} <- {kb:?}: reply went to the mailbox"
        );
        assert!(w.saw_message(a, "hi back"));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A session that had to start on the relay moves to the direct path once one appears,
/// while messages keep flowing: every message arrives exactly once, and later ones go
/// direct.
#[test]
fn a_relayed_session_moves_to_a_direct_path_without_losing_or_duplicating_messages() {
    let mut w = World::with_relay(90, Net::perfect(90));
    let a = w.add_client(None, None);
    let b = w.add_client(None, None);
    let (ia, ib) = (w.clients[a].0.ip(), w.clients[b].0.ip());
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    w.run_for(Duration::from_millis(500));
    // The direct path is broken at first: the session starts on the relay.
    w.net.block(ia, ib);
    let r = w.send(a, "bob", "m0");
    assert_eq!(sent_via(&r), Via::Relay);
    // The path heals; alice keeps sending while her client moves the session.
    w.net.unblock(ia, ib);
    let mut vias = Vec::new();
    for i in 1..=30 {
        let id = w.clients[a].1.command(
            w.now,
            Command::SendMessage {
                to: user("bob"),
                text: format!("m{i}"),
            },
        );
        w.run_for(Duration::from_millis(200));
        vias.push(sent_via(&w.wait_done(a, id, Duration::from_secs(10))));
    }
    w.run_for(Duration::from_secs(2));
    for i in 0..=30 {
        let n = w
            .messages(b)
            .iter()
            .filter(|(_, t, _)| *t == format!("m{i}"))
            .count();
        assert_eq!(n, 1, "m{i} arrived {n} times");
    }
    assert_eq!(
        vias.last(),
        Some(&Via::Direct),
        "the session moved to the direct path: {vias:?}"
    );
    assert!(
        vias.contains(&Via::Relay),
        "some messages went through the relay first: {vias:?}"
    );
    assert!(
        !vias.contains(&Via::Offline),
        "no message fell back to the mailbox: {vias:?}"
    );
}

/// Relay credentials expire; a client that stays online gets fresh ones and allocates
/// again by itself once its allocation can no longer be refreshed.
#[test]
fn a_long_online_client_renews_its_relay_allocation() {
    let mut w = World::with_relay_credentials(95, Net::perfect(95), Duration::from_secs(120));
    let a = w.add_client(None, None);
    w.register(a, "alice");
    w.run_for(Duration::from_secs(1));
    let first = w.clients[a].1.relayed_address().expect("allocated");
    let mut seen = vec![first];
    // Allocations live up to an hour and are refreshed before they end; the 120 s
    // credentials make that refresh fail, and the client must come back with a new one.
    for _ in 0..140 {
        w.run_for(Duration::from_secs(30));
        if let Some(r) = w.clients[a].1.relayed_address() {
            if !seen.contains(&r) {
                seen.push(r);
            }
        }
    }
    assert!(
        seen.len() >= 2,
        "no new allocation after the credentials expired: {seen:?}"
    );
    assert!(
        w.clients[a].1.relayed_address().is_some(),
        "allocated at the end"
    );
    assert!(w.clients[a].1.is_online());
}

/// A symmetric NAT (a new random port per destination) meets a port-restricted one:
/// plain punching cannot work, and the birthday technique finds a direct path within its
/// bounds, in both directions of the call. The hard side learns it is hard from the two
/// STUN answers (supernode and relay), its extra sockets carry the session, and they are
/// closed again once nothing uses them.
#[test]
fn birthday_technique_connects_a_symmetric_nat_to_a_port_restricted_one() {
    use NatKind::*;
    for (seed, caller_hard) in [(90u64, true), (91, false), (92, true), (93, false)] {
        let mut w = World::with_relay(seed, Net::perfect(seed));
        let (ka, kb) = if caller_hard {
            (Symmetric, PortRestricted)
        } else {
            (PortRestricted, Symmetric)
        };
        let a = w.add_client_behind(Some(ka));
        let b = w.add_client_behind(Some(kb));
        w.register(a, "alice");
        w.register(b, "bob");
        w.befriend(a, b, "bob", "alice");
        w.run_for(Duration::from_millis(500)); // STUN answers and relay allocations
        let hard = if caller_hard { a } else { b };
        let easy = if caller_hard { b } else { a };
        assert!(
            w.clients[hard].1.hard_nat(),
            "the symmetric side knows it is hard"
        );
        assert!(
            !w.clients[easy].1.hard_nat(),
            "the port-restricted side is not"
        );
        let r = w.send(a, "bob", "hi");
        assert_eq!(sent_via(&r), Via::Direct, "seed {seed}: direct, not relay");
        assert!(w.saw_message(b, "hi"));
        assert!(
            w.extra_log.iter().any(|(i, _)| *i == hard),
            "the path runs through one of the hard side's extra sockets"
        );
        let sent_before = w.net.sent;
        let r = w.send(b, "alice", "and back");
        assert_eq!(sent_via(&r), Via::Direct);
        assert!(w.saw_message(a, "and back"));
        assert!(
            w.net.sent - sent_before < 20,
            "the session needs no more probes"
        );
        assert_eq!(w.clients[hard].1.extra_sockets(), BIRTHDAY_SOCKETS);
        assert_eq!(w.clients[easy].1.extra_sockets(), 0);
    }
}

/// The easy side's probes are bounded: with no hard side listening (it went silent), a
/// birthday attempt sends at most its budget and ends; the message then takes the relay.
#[test]
fn birthday_probes_are_bounded_when_nothing_answers() {
    use NatKind::*;
    let mut w = World::with_relay(95, Net::perfect(95));
    let a = w.add_client_behind(Some(PortRestricted));
    let b = w.add_client_behind(Some(Symmetric));
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    w.run_for(Duration::from_millis(500));
    assert!(w.clients[b].1.hard_nat());
    // Bob's extra sockets are lost: no mapping will ever answer alice's probes.
    let bob_public: IpAddr = format!("192.0.2.{}", b + 1).parse().unwrap();
    let before = w.net.sent;
    let mut probes_to_bob = 0usize;
    let id = w.clients[a].1.command(
        w.now,
        Command::SendMessage {
            to: user("bob"),
            text: "hi".into(),
        },
    );
    let end = w.now + Duration::from_secs(6);
    while w.now < end {
        // Drop everything bob's extra sockets send, and count alice's datagrams to bob.
        let now = w.now;
        let c = &mut w.clients[b].1;
        while c.poll_extra_transmit().is_some() {}
        let c = &mut w.clients[a].1;
        let mut out = Vec::new();
        while let Some(t) = c.poll_transmit() {
            out.push(t);
        }
        for t in out {
            if t.dst.ip() == bob_public {
                probes_to_bob += 1;
            }
            let addr = w.clients[a].0;
            w.net.send(now, addr, t);
        }
        w.step();
    }
    let r = w.wait_done(a, id, Duration::from_secs(5));
    assert_eq!(
        sent_via(&r),
        Via::Relay,
        "no birthday path: the relay carries it"
    );
    let budget = peerline_core::nat::BirthdayConfig::default().probes;
    assert!(
        probes_to_bob <= budget + 64,
        "{probes_to_bob} datagrams to bob's address, budget {budget}"
    );
    assert!(probes_to_bob >= budget, "the whole budget was tried");
    assert!(w.net.sent > before);
}

// ----- calls -----

use peerline_core::call::CallState;

impl World {
    /// The id of the newest incoming call client `i` saw.
    fn incoming_call(&mut self, i: usize) -> u64 {
        assert!(self.saw(
            i,
            |e| matches!(e, ClientEvent::Call(c) if c.state == CallState::Incoming)
        ));
        self.events[i]
            .iter()
            .rev()
            .find_map(|e| match e {
                ClientEvent::Call(c) if c.state == CallState::Incoming => Some(c.call_id),
                _ => None,
            })
            .unwrap()
    }

    fn ring(&mut self, i: usize, callee: &str) -> CommandResult {
        self.command(i, Command::CallStart { user: user(callee) })
    }

    fn media_received(&self, i: usize, call_id: u64) -> Vec<Vec<u8>> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                ClientEvent::CallMedia { call_id: c, bytes } if *c == call_id => {
                    Some(bytes.clone())
                }
                _ => None,
            })
            .collect()
    }
}

fn call_id_of(r: &CommandResult) -> u64 {
    match r {
        CommandResult::Call { call_id } => *call_id,
        other => panic!("not ringing: {other:?}"),
    }
}

/// A whole call between contacts: ring, answer, media both ways over the direct session
/// (the supernode sees none of it), hang up.
#[test]
fn a_call_rings_connects_directly_carries_media_and_hangs_up() {
    let mut w = World::new(120, Net::lossy(120, 0.02, 0.01, Duration::from_millis(30)));
    let a = w.add_client(None, None);
    let b = w.add_client(None, None);
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    let r = w.ring(a, "bob");
    let call = call_id_of(&r);
    assert_eq!(w.incoming_call(b), call);
    assert_eq!(w.call_state(a, call).unwrap().state, CallState::Ringing);
    let r = w.command(
        b,
        Command::CallAnswer {
            call_id: call,
            accept: true,
        },
    );
    assert_eq!(r, CommandResult::Ok);
    let ca = w.wait_call(a, call, CallState::Active);
    let cb = w.wait_call(b, call, CallState::Active);
    assert_eq!(ca.via, Some(Via::Direct));
    assert_eq!(cb.via, Some(Via::Direct));
    assert!(ca.setup_ms.is_some() && cb.setup_ms.is_some());
    // Five seconds of 50 packets a second each way.
    let sn_before = w.sn_datagrams;
    for n in 0..250u32 {
        let now = w.now;
        assert!(w.clients[a]
            .1
            .send_call_media(now, call, n.to_le_bytes().to_vec()));
        assert!(w.clients[b]
            .1
            .send_call_media(now, call, (1000 + n).to_le_bytes().to_vec()));
        for _ in 0..4 {
            w.step(); // 20 ms
        }
    }
    w.run_for(Duration::from_millis(200));
    let got_b = w.media_received(b, call);
    let got_a = w.media_received(a, call);
    // 2 % loss: most arrive; none is made up or altered.
    assert!(got_b.len() >= 225, "bob got {} of 250", got_b.len());
    assert!(got_a.len() >= 225, "alice got {} of 250", got_a.len());
    assert!(got_b
        .iter()
        .all(|p| u32::from_le_bytes(p[..4].try_into().unwrap()) < 250));
    assert!(got_a
        .iter()
        .all(|p| (1000..1250).contains(&u32::from_le_bytes(p[..4].try_into().unwrap()))));
    assert!(
        w.sn_datagrams - sn_before <= 12,
        "the supernode saw {} datagrams during 5 s of media",
        w.sn_datagrams - sn_before
    );
    assert_eq!(
        w.command(a, Command::CallHangUp { call_id: call }),
        CommandResult::Ok
    );
    let end_a = w.wait_call(a, call, CallState::Ended);
    let end_b = w.wait_call(b, call, CallState::Ended);
    assert_eq!(end_a.end_reason.as_deref(), Some("hung up"));
    assert_eq!(end_b.end_reason.as_deref(), Some("the other side hung up"));
    assert!(w.clients[a].1.calls().is_empty() && w.clients[b].1.calls().is_empty());
    let now = w.now;
    assert!(
        !w.clients[a].1.send_call_media(now, call, vec![1]),
        "no media after the end"
    );
}

/// A stranger cannot ring a user, and the refusal reads the same whether the user is
/// online or not; decline, cancel, busy and the ring timeout each end the call as named.
#[test]
fn call_refusals_and_endings() {
    let mut w = World::new(121, Net::perfect(121));
    let a = w.add_client(None, None);
    let b = w.add_client(None, None);
    let c = w.add_client(None, None);
    w.register(a, "alice");
    w.register(b, "bob");
    w.register(c, "carol");
    w.befriend(a, b, "bob", "alice");
    w.befriend(c, b, "bob", "carol");
    // Carol is a stranger to alice: refused, online or not, with the same words.
    let online = w.ring(c, "alice");
    let ghost = w.ring(c, "nobody");
    let strip = |r: &CommandResult| match r {
        CommandResult::Error { code, detail } => {
            (*code, detail.replace("alice", "X").replace("nobody", "X"))
        }
        other => panic!("not refused: {other:?}"),
    };
    assert_eq!(strip(&online).0, ErrorCode::NotContact);
    assert_eq!(
        strip(&online),
        strip(&ghost),
        "an online user looks like a missing one"
    );
    assert!(
        !w.events[a]
            .iter()
            .any(|e| matches!(e, ClientEvent::Call(_))),
        "alice never rang"
    );

    // Declined.
    let call = call_id_of(&w.ring(a, "bob"));
    let inc = w.incoming_call(b);
    assert_eq!(inc, call);
    w.command(
        b,
        Command::CallAnswer {
            call_id: call,
            accept: false,
        },
    );
    assert_eq!(
        w.wait_call(a, call, CallState::Ended).end_reason.as_deref(),
        Some("declined")
    );

    // Cancelled by the caller while ringing.
    let call = call_id_of(&w.ring(a, "bob"));
    assert_eq!(w.incoming_call(b), call);
    w.command(a, Command::CallHangUp { call_id: call });
    assert_eq!(
        w.wait_call(b, call, CallState::Ended).end_reason.as_deref(),
        Some("cancelled")
    );

    // Busy: bob is in a call with alice when carol rings.
    let call = call_id_of(&w.ring(a, "bob"));
    assert_eq!(w.incoming_call(b), call);
    w.command(
        b,
        Command::CallAnswer {
            call_id: call,
            accept: true,
        },
    );
    w.wait_call(a, call, CallState::Active);
    match w.ring(c, "bob") {
        CommandResult::Error { code, .. } => assert_eq!(code, ErrorCode::Busy),
        other => panic!("expected busy: {other:?}"),
    }
    w.command(b, Command::CallHangUp { call_id: call });
    w.wait_call(a, call, CallState::Ended);

    // Nobody answers: the caller gives up after 30 s and the callee stops ringing.
    let call = call_id_of(&w.ring(a, "bob"));
    assert_eq!(w.incoming_call(b), call);
    let started = w.now;
    assert_eq!(
        w.wait_call(a, call, CallState::Ended).end_reason.as_deref(),
        Some("no answer")
    );
    assert!(w.now - started >= Duration::from_secs(29));
    assert_eq!(
        w.wait_call(b, call, CallState::Ended).end_reason.as_deref(),
        Some("cancelled")
    );
}

/// A user who takes calls from anyone can be rung by a stranger, and the answered call
/// gets its session although the two are not contacts; media stops when it ends.
#[test]
fn anyone_can_call_lets_a_stranger_ring_and_connect() {
    let mut w = World::new(122, Net::perfect(122));
    let a = w.add_client(None, None);
    let d = w.add_client(None, None);
    w.register(a, "alice");
    w.register(d, "dave");
    assert!(matches!(
        w.ring(d, "alice"),
        CommandResult::Error {
            code: ErrorCode::NotContact,
            ..
        }
    ));
    assert_eq!(
        w.command(a, Command::SetCallPolicy { anyone: true }),
        CommandResult::Ok
    );
    let call = call_id_of(&w.ring(d, "alice"));
    assert_eq!(w.incoming_call(a), call);
    w.command(
        a,
        Command::CallAnswer {
            call_id: call,
            accept: true,
        },
    );
    assert_eq!(
        w.wait_call(d, call, CallState::Active).via,
        Some(Via::Direct)
    );
    w.wait_call(a, call, CallState::Active);
    let now = w.now;
    assert!(w.clients[d].1.send_call_media(now, call, vec![7; 100]));
    w.run_for(Duration::from_millis(100));
    assert_eq!(w.media_received(a, call), vec![vec![7; 100]]);
    // Still strangers: no messages between them.
    match w.send(d, "alice", "hi") {
        CommandResult::Error { code, .. } => assert_eq!(code, ErrorCode::NotContact),
        other => panic!("a stranger's message went through: {other:?}"),
    }
}

/// Two symmetric NATs: the call's media takes the relay, and says so.
#[test]
fn a_call_between_two_symmetric_nats_runs_over_the_relay() {
    use NatKind::*;
    let mut w = World::with_relay(123, Net::perfect(123));
    let a = w.add_client_behind(Some(Symmetric));
    let b = w.add_client_behind(Some(Symmetric));
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    w.run_for(Duration::from_millis(500));
    let call = call_id_of(&w.ring(a, "bob"));
    assert_eq!(w.incoming_call(b), call);
    w.command(
        b,
        Command::CallAnswer {
            call_id: call,
            accept: true,
        },
    );
    assert_eq!(
        w.wait_call(a, call, CallState::Active).via,
        Some(Via::Relay)
    );
    assert_eq!(
        w.wait_call(b, call, CallState::Active).via,
        Some(Via::Relay)
    );
    let now = w.now;
    assert!(w.clients[a].1.send_call_media(now, call, vec![1, 2, 3]));
    w.run_for(Duration::from_millis(200));
    assert_eq!(w.media_received(b, call), vec![vec![1, 2, 3]]);
}

/// When the other side goes silent (its process died), the call ends by itself.
#[test]
fn a_call_ends_when_media_stops() {
    let mut w = World::new(124, Net::perfect(124));
    let a = w.add_client(None, None);
    let b = w.add_client(None, None);
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, b, "bob", "alice");
    let call = call_id_of(&w.ring(a, "bob"));
    w.incoming_call(b);
    w.command(
        b,
        Command::CallAnswer {
            call_id: call,
            accept: true,
        },
    );
    w.wait_call(a, call, CallState::Active);
    w.frozen.push(b);
    let c = w.wait_call(a, call, CallState::Ended);
    assert!(
        c.end_reason.as_deref() == Some("no audio from the other side for 15 s")
            || c.end_reason.as_deref() == Some("the connection to the other side broke"),
        "{c:?}"
    );
}
