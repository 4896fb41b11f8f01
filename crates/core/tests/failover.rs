//! Fleet failover of the client core: the host cache, `Hosts` and `Redirect` pushes,
//! `Full`/`Draining` refusals, fast detection of a vanished supernode, and direct peer
//! sessions that carry on while their users move to another supernode.
//!
//! Two harnesses, both on virtual time: scripted supernodes (a bare Noise responder and
//! link, so a test can push exactly what it wants), and a world of two real sans-IO
//! supernodes sharing one key, one authority and one store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_core::call::CallState;
use peerline_core::client::{
    Client, ClientConfig, ClientEvent, Command, CommandId, CommandResult, Via,
};
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::link::{Link, LinkConfig, LinkEvent, Transmit, FLEET_KEEPALIVE};
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::sim::Net;
use peerline_core::supernode::{Supernode, SupernodeConfig};
use peerline_crypto::cert::CertRequest;
use peerline_crypto::noise::Responder;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_wire::msg::{ContactAction, Request, Response, Welcome};
use peerline_wire::packet::{Packet, RejectReason};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const UNIX_START_MS: u64 = 1_790_000_000_000;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn user(s: &str) -> Username {
    Username::parse(s).unwrap()
}

// ----- scripted supernodes -----

/// A supernode that logs in anyone with a valid handshake (or refuses with `reject`) and
/// records what the client sends it.
struct Scripted {
    addr: SocketAddr,
    reject: Option<RejectReason>,
    link: Option<Link>,
    /// When each handshake initiation arrived.
    inits: Vec<Instant>,
    /// Answers the client gave to our pushes.
    answers: Vec<(u64, Response)>,
    /// When each datagram of an established session arrived.
    heard: Vec<Instant>,
}

/// A client and the scripted supernodes of its fleet, on a perfect network.
struct Bench {
    now: Instant,
    client: Client,
    client_addr: SocketAddr,
    sns: Vec<Scripted>,
    sn_keys: DeviceKeys,
    events: Vec<(Instant, ClientEvent)>,
    rng: ChaCha20Rng,
    /// Every handshake initiation, in arrival order, with where it went.
    logins: Vec<(Instant, SocketAddr)>,
}

impl Bench {
    /// A client with a certificate, bootstrapped at `hosts[0]`, with the rest of `hosts`
    /// scripted too but not yet known to it.
    fn new(hosts: &[&str]) -> Self {
        let now = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let authority = Authority::generate(&mut rng);
        let keys = DeviceKeys::generate(&mut rng);
        let cert = authority.issue(
            &CertRequest {
                username: user("alice"),
                device_id: [1; 16],
                noise_key: keys.noise_public(),
                sign_key: keys.sign_public(),
            },
            1,
            UNIX_START_MS / 1000,
            86_400,
        );
        let sns: Vec<Scripted> = hosts
            .iter()
            .map(|h| Scripted {
                addr: addr(h),
                reject: None,
                link: None,
                inits: Vec::new(),
                answers: Vec::new(),
                heard: Vec::new(),
            })
            .collect();
        let cfg = ClientConfig::new(sns[0].addr, sn_keys.noise_public(), authority.public());
        let client = Client::new(
            cfg,
            keys,
            Some(&cert.to_bytes()),
            [3; 32],
            WallClock::new(now, UNIX_START_MS),
            now,
        );
        Bench {
            now,
            client,
            client_addr: addr("198.51.100.10:5000"),
            sns,
            sn_keys,
            events: Vec::new(),
            rng,
            logins: Vec::new(),
        }
    }

    fn sn(&mut self, a: &str) -> &mut Scripted {
        let a = addr(a);
        self.sns.iter_mut().find(|s| s.addr == a).unwrap()
    }

    /// The scripted supernode at `to` handles one datagram; returns what it answers.
    fn sn_handle(&mut self, to: SocketAddr, bytes: &[u8]) -> Vec<Transmit> {
        let now = self.now;
        let client_addr = self.client_addr;
        let static_private = self.sn_keys.noise_private();
        let mut seed = [0u8; 32];
        rand_chacha::rand_core::RngCore::fill_bytes(&mut self.rng, &mut seed);
        let Some(sn) = self.sns.iter_mut().find(|s| s.addr == to) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match Packet::decode(bytes) {
            Ok(Packet::HandshakeInit { sender, noise, .. }) => {
                sn.inits.push(now);
                self.logins.push((now, to));
                if let Some(reason) = sn.reject {
                    let mut b = Vec::new();
                    Packet::Reject {
                        receiver: sender,
                        reason,
                        version: PROTOCOL_VERSION,
                    }
                    .encode(&mut b);
                    out.push(Transmit {
                        dst: client_addr,
                        payload: b,
                    });
                    return out;
                }
                let r = Responder::read(&static_private, seed, noise).unwrap();
                let welcome = Welcome {
                    version: PROTOCOL_VERSION,
                    unix_ms: UNIX_START_MS,
                    cert: None,
                }
                .encode()
                .unwrap();
                let (transport, msg2) = r.accept(&welcome).unwrap();
                let mut b = Vec::new();
                Packet::HandshakeResponse {
                    sender: 77,
                    receiver: sender,
                    noise: &msg2,
                }
                .encode(&mut b);
                out.push(Transmit {
                    dst: client_addr,
                    payload: b,
                });
                sn.link = Some(Link::new(
                    LinkConfig::server(),
                    transport,
                    77,
                    sender,
                    client_addr,
                    now,
                ));
            }
            Ok(Packet::Transport {
                counter,
                ciphertext,
                ..
            }) => {
                if let Some(link) = sn.link.as_mut() {
                    if link
                        .handle_transport(now, client_addr, counter, ciphertext)
                        .is_ok()
                    {
                        sn.heard.push(now);
                    }
                    while let Some(e) = link.poll_event() {
                        match e {
                            LinkEvent::Response { id, body } => sn.answers.push((id, body)),
                            LinkEvent::Request { id, .. } => {
                                let _ = link.respond(now, id, Response::Ok);
                            }
                            _ => {}
                        }
                    }
                    while let Some(t) = link.poll_transmit() {
                        out.push(t);
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// Supernode `a` pushes `body` to the client over its session.
    fn push(&mut self, a: &str, body: Request) -> u64 {
        let now = self.now;
        let client_addr = self.client_addr;
        let sn = self.sn(a);
        let link = sn.link.as_mut().expect("a session to push on");
        let id = link.send_request(now, body).unwrap();
        let mut out = Vec::new();
        while let Some(t) = link.poll_transmit() {
            out.push(t);
        }
        let from = addr(a);
        for t in out {
            assert_eq!(t.dst, client_addr);
            self.client.handle_datagram(now, from, &t.payload);
        }
        id
    }

    /// One 5 ms tick: the client's datagrams reach the scripted supernodes at once and
    /// their answers come straight back.
    fn step(&mut self) {
        for _ in 0..8 {
            let mut any = false;
            while let Some(t) = self.client.poll_transmit() {
                any = true;
                for back in self.sn_handle(t.dst, &t.payload) {
                    self.client.handle_datagram(self.now, t.dst, &back.payload);
                }
            }
            if !any {
                break;
            }
        }
        while let Some(e) = self.client.poll_event() {
            self.events.push((self.now, e));
        }
        self.now += Duration::from_millis(5);
        if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
            self.client.handle_timeout(self.now);
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.step();
        }
        done(self)
    }
}

#[test]
fn a_hosts_push_fills_the_cache_is_reported_and_turns_on_fleet_keepalives() {
    let mut b = Bench::new(&["203.0.113.1:7000", "203.0.113.2:7000", "203.0.113.3:7000"]);
    b.client.connect(b.now);
    assert!(b.run_until(Duration::from_secs(2), |b| b.client.is_online()));
    assert!(!b.client.in_fleet());
    assert_eq!(b.client.supernode(), addr("203.0.113.1:7000"));
    let hosts = vec![
        addr("203.0.113.2:7000"),
        addr("203.0.113.3:7000"),
        // Duplicates, the supernode itself and unusable addresses are left out.
        addr("203.0.113.2:7000"),
        addr("203.0.113.1:7000"),
        addr("0.0.0.0:7000"),
        addr("203.0.113.9:0"),
    ];
    let id = b.push("203.0.113.1:7000", Request::Hosts { hosts });
    b.run_for(Duration::from_millis(50));
    assert!(b
        .sn("203.0.113.1:7000")
        .answers
        .contains(&(id, Response::Ok)));
    let learnt = vec![addr("203.0.113.2:7000"), addr("203.0.113.3:7000")];
    assert_eq!(
        b.client.hosts(),
        &[
            addr("203.0.113.1:7000"),
            addr("203.0.113.2:7000"),
            addr("203.0.113.3:7000")
        ]
    );
    assert!(b
        .events
        .iter()
        .any(|(_, e)| *e == ClientEvent::Hosts(learnt.clone())));
    assert!(b.client.in_fleet());
    // The same list again changes nothing and is not reported again.
    b.push(
        "203.0.113.1:7000",
        Request::Hosts {
            hosts: learnt.clone(),
        },
    );
    b.run_for(Duration::from_millis(50));
    let reported = b
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Hosts(_)))
        .count();
    assert_eq!(reported, 1);
    // An idle fleet session sends a keepalive every FLEET_KEEPALIVE (a lone supernode: every
    // 25 s).
    let from = b.now;
    b.sn("203.0.113.1:7000").heard.clear();
    b.run_for(Duration::from_secs(35));
    let heard: Vec<u64> = b
        .sn("203.0.113.1:7000")
        .heard
        .iter()
        .map(|t| t.duration_since(from).as_secs())
        .collect();
    let expected = (35 / FLEET_KEEPALIVE.as_secs()) as usize;
    assert_eq!(heard.len(), expected, "keepalives heard at {heard:?}");
    assert!(heard
        .iter()
        .all(|s| *s <= FLEET_KEEPALIVE.as_secs() * expected as u64));
    // An empty list: a lone supernode again.
    b.push("203.0.113.1:7000", Request::Hosts { hosts: Vec::new() });
    b.run_for(Duration::from_millis(50));
    assert!(!b.client.in_fleet());
    assert_eq!(b.client.hosts(), &[addr("203.0.113.1:7000")]);
    assert!(b
        .events
        .iter()
        .any(|(_, e)| *e == ClientEvent::Hosts(Vec::new())));
}

#[test]
fn a_redirect_is_answered_then_the_client_logs_in_at_the_new_host_at_once() {
    let mut b = Bench::new(&["203.0.113.1:7000", "203.0.113.2:7000"]);
    b.client.connect(b.now);
    assert!(b.run_until(Duration::from_secs(2), |b| b.client.is_online()));
    let at = b.now;
    let id = b.push(
        "203.0.113.1:7000",
        Request::Redirect {
            hosts: vec![addr("203.0.113.2:7000")],
        },
    );
    b.step();
    // The draining supernode got its answer, and the new one the login, in the same tick.
    assert!(b
        .sn("203.0.113.1:7000")
        .answers
        .contains(&(id, Response::Ok)));
    assert_eq!(b.sn("203.0.113.2:7000").inits, vec![at]);
    assert!(b.run_until(Duration::from_millis(100), |b| b.client.is_online()));
    assert_eq!(b.client.supernode(), addr("203.0.113.2:7000"));
    assert!(b.client.in_fleet());
}

#[test]
fn the_host_cache_is_bounded_and_a_redirect_to_nowhere_keeps_the_session() {
    let mut b = Bench::new(&["203.0.113.1:7000"]);
    b.client.connect(b.now);
    assert!(b.run_until(Duration::from_secs(2), |b| b.client.is_online()));
    let many: Vec<SocketAddr> = (0..40u16)
        .map(|i| SocketAddr::from(([198, 18, 0, 1], 7000 + i)))
        .collect();
    b.push(
        "203.0.113.1:7000",
        Request::Hosts {
            hosts: many[..peerline_wire::msg::MAX_HOSTS].to_vec(),
        },
    );
    b.run_for(Duration::from_millis(20));
    assert_eq!(b.client.hosts().len(), peerline_wire::msg::MAX_HOSTS + 1);
    assert_eq!(b.client.hosts()[0], addr("203.0.113.1:7000"));
    // A saved cache cannot grow it beyond the bound either.
    b.client.add_hosts(&many);
    assert_eq!(b.client.hosts().len(), peerline_wire::msg::MAX_HOSTS + 1);
    // A redirect that names only this supernode (or nothing usable) moves nowhere.
    b.push(
        "203.0.113.1:7000",
        Request::Redirect {
            hosts: vec![addr("203.0.113.1:7000"), addr("0.0.0.0:7000")],
        },
    );
    b.run_for(Duration::from_millis(20));
    assert!(b.client.is_online());
    assert_eq!(b.client.supernode(), addr("203.0.113.1:7000"));
    assert_eq!(b.sn("203.0.113.1:7000").inits.len(), 1);
    // ... and leaves the cache as it was.
    assert_eq!(b.client.hosts().len(), peerline_wire::msg::MAX_HOSTS + 1);
}

#[test]
fn full_and_draining_refusals_try_every_host_once_at_once_then_back_off() {
    let hosts = ["203.0.113.1:7000", "203.0.113.2:7000", "203.0.113.3:7000"];
    let mut b = Bench::new(&hosts);
    b.client
        .add_hosts(&[addr("203.0.113.2:7000"), addr("203.0.113.3:7000")]);
    b.sn(hosts[0]).reject = Some(RejectReason::Full);
    b.sn(hosts[1]).reject = Some(RejectReason::Draining);
    b.sn(hosts[2]).reject = Some(RejectReason::Full);
    let t0 = b.now;
    b.client.connect(t0);
    b.run_for(Duration::from_secs(3));
    let order = b.logins.clone();
    let at: Vec<SocketAddr> = order.iter().map(|(_, a)| *a).collect();
    assert!(at.len() >= 5, "{order:?}");
    // Round robin over the cache.
    for (i, a) in at.iter().enumerate() {
        assert_eq!(*a, addr(hosts[i % 3]), "login {i} went to {a}: {order:?}");
    }
    // The first round goes at once, host after host ...
    assert!(order[..3].iter().all(|(t, _)| *t == t0), "{order:?}");
    // ... then refusals wait out the jittered backoff (at least 125 ms).
    for w in order[2..].windows(2) {
        assert!(
            w[1].0.duration_since(w[0].0) >= Duration::from_millis(125),
            "{order:?}"
        );
    }
    assert!(!b.client.is_online());
    // Once one has room, the client is in, and a later refusal starts a fresh round.
    b.sn(hosts[1]).reject = None;
    assert!(b.run_until(Duration::from_secs(10), |b| b.client.is_online()));
    assert_eq!(b.client.supernode(), addr(hosts[1]));
    let offline = b
        .events
        .iter()
        .filter(|(_, e)| matches!(e, ClientEvent::Offline { reason } if reason.contains("full") || reason.contains("shutting down")))
        .count();
    assert!(offline >= 3, "each refusal is reported");
}

#[test]
fn a_silent_supernode_of_a_fleet_is_left_for_the_next_host_within_15s() {
    let hosts = ["203.0.113.1:7000", "203.0.113.2:7000"];
    let mut b = Bench::new(&hosts);
    b.client.connect(b.now);
    assert!(b.run_until(Duration::from_secs(2), |b| b.client.is_online()));
    b.push(
        hosts[0],
        Request::Hosts {
            hosts: vec![addr(hosts[1])],
        },
    );
    b.run_for(Duration::from_secs(3));
    // The supernode vanishes (SIGKILL): it no longer answers anything.
    let killed = b.now;
    let gone = addr(hosts[0]);
    b.sns.retain(|s| s.addr != gone);
    assert!(
        b.run_until(Duration::from_secs(20), |b| b.client.is_online()
            && b.client.supernode() == addr(hosts[1]))
    );
    let took = b.now.duration_since(killed);
    assert!(
        took <= Duration::from_secs(15),
        "online elsewhere after {took:?}"
    );
}

#[test]
fn a_lone_supernode_keeps_the_slow_keepalive_and_its_address() {
    let mut b = Bench::new(&["203.0.113.1:7000"]);
    b.client.connect(b.now);
    assert!(b.run_until(Duration::from_secs(2), |b| b.client.is_online()));
    b.sns.clear();
    let gone = b.now;
    // Not declared dead on a missed keepalive: the 80 s idle timeout applies.
    assert!(b.run_until(Duration::from_secs(120), |b| !b.client.is_online()));
    assert!(
        // 80 s after the last datagram heard, just before `gone`.
        b.now.duration_since(gone) >= Duration::from_secs(79),
        "offline after {:?}: {:?}",
        b.now.duration_since(gone),
        b.events.last()
    );
    assert_eq!(b.client.supernode(), addr("203.0.113.1:7000"));
}

#[test]
fn hosts_and_redirect_encode_as_the_protocol_document_says() {
    use peerline_wire::msg::Frame;
    let hosts = Frame::Request {
        id: 5,
        body: Request::Hosts {
            hosts: vec![addr("192.0.2.2:7000")],
        },
    };
    assert_eq!(
        hosts.encode().unwrap(),
        [0x01, 0x05, 0x15, 0x01, 0x00, 0xc0, 0x00, 0x02, 0x02, 0xd8, 0x36]
    );
    let redirect = Frame::Request {
        id: 6,
        body: Request::Redirect {
            hosts: vec![addr("192.0.2.2:7000"), addr("192.0.2.3:7000")],
        },
    };
    assert_eq!(
        redirect.encode().unwrap(),
        [
            0x01, 0x06, 0x16, 0x02, 0x00, 0xc0, 0x00, 0x02, 0x02, 0xd8, 0x36, 0x00, 0xc0, 0x00,
            0x02, 0x03, 0xd8, 0x36
        ]
    );
    // Over the limit: neither sent nor accepted.
    let many = Frame::Request {
        id: 7,
        body: Request::Hosts {
            hosts: vec![addr("192.0.2.2:7000"); peerline_wire::msg::MAX_HOSTS + 1],
        },
    };
    assert!(many.encode().is_err());
}

// ----- two real supernodes -----

const SN_A: &str = "203.0.113.1:7000";
const SN_B: &str = "203.0.113.3:7000";

/// Two supernodes of one fleet (same Noise key and authority, one store, each its own
/// online directory) and clients on a seeded network.
struct Fleet {
    now: Instant,
    t0: Instant,
    net: Net,
    sns: Vec<(SocketAddr, Supernode, bool)>,
    sn_keys: DeviceKeys,
    authority_bytes: [u8; 32],
    store: MemoryStore,
    rng: ChaCha20Rng,
    clients: Vec<(SocketAddr, Client)>,
    events: Vec<Vec<(Instant, ClientEvent)>>,
}

impl Fleet {
    fn new(seed: u64, net: Net) -> Self {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let authority = Authority::generate(&mut rng);
        let authority_bytes = authority.to_bytes();
        let sns = [SN_A, SN_B]
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let sn = Supernode::new(
                    SupernodeConfig::default(),
                    sn_keys.noise_private(),
                    Authority::from_bytes(&authority_bytes),
                    [seed as u8 + i as u8; 32],
                    Box::new(MemoryDirectory::new()),
                    WallClock::new(t0, UNIX_START_MS),
                    t0,
                );
                (addr(a), sn, true)
            })
            .collect();
        Fleet {
            now: t0,
            t0,
            net,
            sns,
            sn_keys,
            authority_bytes,
            store: MemoryStore::new(),
            rng,
            clients: Vec::new(),
            events: Vec::new(),
        }
    }

    /// A client bootstrapped at A (it learns of B later, see [`failover_run`]).
    fn add_client(&mut self) -> usize {
        let i = self.clients.len();
        let caddr: SocketAddr = format!("198.51.100.{}:{}", i + 10, 5000 + i)
            .parse()
            .unwrap();
        let keys = DeviceKeys::generate(&mut self.rng);
        let cfg = ClientConfig::new(
            addr(SN_A),
            self.sn_keys.noise_public(),
            Authority::from_bytes(&self.authority_bytes).public(),
        );
        let elapsed = self.now.duration_since(self.t0).as_millis() as u64;
        let mut c = Client::new(
            cfg,
            keys,
            None,
            [i as u8 + 1; 32],
            WallClock::new(self.now, UNIX_START_MS + elapsed),
            self.now,
        );
        c.set_local_candidates(vec![caddr]);
        c.connect(self.now);
        self.clients.push((caddr, c));
        self.events.push(Vec::new());
        i
    }

    /// Supernode at `a` vanishes: not run any more, everything sent to it is lost.
    fn kill(&mut self, a: &str) {
        let a = addr(a);
        for s in &mut self.sns {
            if s.0 == a {
                s.2 = false;
            }
        }
    }

    fn sn(&self, a: &str) -> &Supernode {
        let a = addr(a);
        &self.sns.iter().find(|s| s.0 == a).unwrap().1
    }

    fn step(&mut self) {
        let now = self.now;
        for (a, sn, alive) in &mut self.sns {
            if !*alive {
                continue;
            }
            while let Some((token, op)) = sn.poll_op() {
                let r = execute(&mut self.store, op, &mut self.rng);
                sn.handle_op_result(now, token, r);
            }
            while let Some(t) = sn.poll_transmit() {
                self.net.send(now, *a, t);
            }
        }
        for (i, (a, c)) in self.clients.iter_mut().enumerate() {
            while let Some(t) = c.poll_transmit() {
                self.net.send(now, *a, t);
            }
            while let Some(e) = c.poll_event() {
                if let ClientEvent::Message { token, .. } = &e {
                    c.message_saved(now, *token);
                }
                self.events[i].push((now, e));
            }
            while let Some(t) = c.poll_transmit() {
                self.net.send(now, *a, t);
            }
        }
        for (from, Transmit { dst, payload }) in self.net.deliver(now) {
            if let Some((_, sn, alive)) = self.sns.iter_mut().find(|s| s.0 == dst) {
                if *alive {
                    sn.handle_datagram(now, from, &payload);
                }
            } else if let Some((_, c)) = self.clients.iter_mut().find(|(a, _)| *a == dst) {
                c.handle_datagram(now, from, &payload);
            }
        }
        self.now += Duration::from_millis(5);
        let now = self.now;
        for (_, sn, alive) in &mut self.sns {
            if *alive && sn.poll_timeout().is_some_and(|t| t <= now) {
                sn.handle_timeout(now);
            }
        }
        for (_, c) in &mut self.clients {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    fn done(&self, i: usize, id: CommandId) -> Option<CommandResult> {
        self.events[i].iter().find_map(|(_, e)| match e {
            ClientEvent::CommandDone { id: d, result } if *d == id => Some(result.clone()),
            _ => None,
        })
    }

    fn command(&mut self, i: usize, cmd: Command) -> CommandResult {
        let id = self.clients[i].1.command(self.now, cmd);
        let end = self.now + Duration::from_secs(60);
        while self.now < end {
            self.step();
            if let Some(r) = self.done(i, id) {
                return r;
            }
        }
        panic!("command {id} of client {i} did not finish");
    }

    /// When client `i` received the message `text`, and how many copies.
    fn received(&self, i: usize, text: &str) -> (Option<Instant>, usize) {
        let hits: Vec<Instant> = self.events[i]
            .iter()
            .filter_map(|(t, e)| match e {
                ClientEvent::Message { text: x, via, .. } if x == text => {
                    assert_eq!(*via, Via::Direct, "{text} travelled {via:?}");
                    Some(*t)
                }
                _ => None,
            })
            .collect();
        (hits.first().copied(), hits.len())
    }

    /// When client `i` last came online.
    fn online_since(&self, i: usize) -> Option<Instant> {
        self.events[i]
            .iter()
            .rev()
            .find(|(_, e)| *e == ClientEvent::Online)
            .map(|(t, _)| *t)
    }
}

/// The measured outcome of one failover run.
struct Outcome {
    /// From the kill until both users were online on B.
    failover: Duration,
    /// Longest time from a send to its delivery, over every message of the run.
    worst_delivery: Duration,
    messages: usize,
    /// Longest gap between two media packets received, over both sides of the call.
    worst_media_gap: Option<Duration>,
}

/// Alice and bob on A with a direct session and messages both ways every 250 ms (and,
/// `with_call`, a call with media both ways every 20 ms); A is killed `kill_after` into
/// the stream; the stream goes on for 30 s more.
fn failover_run(seed: u64, net: Net, kill_after: Duration, with_call: bool) -> Outcome {
    let mut w = Fleet::new(seed, net);
    let (a, b) = (w.add_client(), w.add_client());
    for (i, name) in [(a, "alice"), (b, "bob")] {
        let r = w.command(
            i,
            Command::Register {
                username: user(name),
                password: "correct horse".into(),
            },
        );
        assert_eq!(r, CommandResult::Ok);
    }
    assert_eq!(
        w.command(
            a,
            Command::ContactAdd {
                user: user("bob"),
                note: "hi".into()
            }
        ),
        CommandResult::Ok
    );
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
    // On a lossy network a dial can miss its window (the message then goes to the
    // mailbox): try until the direct session is up.
    let direct = (0..5).any(|k| {
        let r = w.command(
            a,
            Command::SendMessage {
                to: user("bob"),
                text: format!("hello {k}"),
            },
        );
        matches!(
            r,
            CommandResult::Sent {
                via: Via::Direct,
                ..
            }
        )
    });
    assert!(direct, "seed {seed}: no direct session");
    assert_eq!(w.sn(SN_A).online_count(), 2);
    assert_eq!(w.sn(SN_B).online_count(), 0);
    // Now they learn of B, as from a `Hosts` push or a saved host cache; each gets the
    // fleet's keepalive timing on its live session.
    for i in [a, b] {
        w.clients[i].1.add_hosts(&[addr(SN_B)]);
        assert!(w.clients[i].1.in_fleet());
    }
    let call = with_call.then(|| {
        let call_id = match w.command(a, Command::CallStart { user: user("bob") }) {
            CommandResult::Call { call_id } => call_id,
            other => panic!("seed {seed}: not ringing: {other:?}"),
        };
        let r = w.command(
            b,
            Command::CallAnswer {
                call_id,
                accept: true,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        let end = w.now + Duration::from_secs(5);
        while w.now < end && !active_on_both(&w, [a, b], call_id) {
            w.step();
        }
        assert!(active_on_both(&w, [a, b], call_id), "seed {seed}: no call");
        call_id
    });
    // Settle into idle keepalives so the kill lands anywhere in their cycle.
    w.run_for(Duration::from_secs(12));
    let media_from = w.now;

    let stream_start = w.now;
    let kill_at = stream_start + kill_after;
    let end = kill_at + Duration::from_secs(30);
    let mut sent: Vec<(usize, usize, String, Instant, CommandId)> = Vec::new();
    let mut next_send = w.now;
    let mut n = 0;
    let mut killed = false;
    while w.now < end {
        if !killed && w.now >= kill_at {
            w.kill(SN_A);
            killed = true;
        }
        if w.now >= next_send {
            for (from, to, name) in [(a, b, "bob"), (b, a, "alice")] {
                let text = format!("m{n} from {from}");
                let id = w.clients[from].1.command(
                    w.now,
                    Command::SendMessage {
                        to: user(name),
                        text: text.clone(),
                    },
                );
                sent.push((from, to, text, w.now, id));
            }
            n += 1;
            next_send += Duration::from_millis(250);
        }
        if let Some(call_id) = call {
            if w.now
                .duration_since(media_from)
                .as_millis()
                .is_multiple_of(20)
            {
                let now = w.now;
                for i in [a, b] {
                    assert!(
                        w.clients[i]
                            .1
                            .send_call_media(now, call_id, vec![i as u8; 160]),
                        "seed {seed}: the call of client {i} ended"
                    );
                }
            }
        }
        w.step();
    }
    w.run_for(Duration::from_secs(2));

    let mut worst = Duration::ZERO;
    for (from, to, text, at, id) in &sent {
        let (got, copies) = w.received(*to, text);
        let got = got.unwrap_or_else(|| panic!("seed {seed}: {text} was lost"));
        assert_eq!(copies, 1, "seed {seed}: {text} shown {copies} times");
        worst = worst.max(got.duration_since(*at));
        match w.done(*from, *id) {
            Some(CommandResult::Sent {
                via: Via::Direct, ..
            }) => {}
            other => panic!("seed {seed}: {text} ended {other:?}"),
        }
    }
    for i in [a, b] {
        let c = &w.clients[i].1;
        assert!(c.is_online(), "seed {seed}: client {i} is offline");
        assert_eq!(c.supernode(), addr(SN_B));
        assert_eq!(c.direct_peers().len(), 1, "the direct session survived");
    }
    assert_eq!(w.sn(SN_B).online_count(), 2);
    let worst_media_gap = call.map(|call_id| {
        assert!(active_on_both(&w, [a, b], call_id), "seed {seed}: call ended");
        let mut worst = Duration::ZERO;
        for i in [a, b] {
            let got: Vec<Instant> = w.events[i]
                .iter()
                .filter(|(_, e)| matches!(e, ClientEvent::CallMedia { call_id: c, .. } if *c == call_id))
                .map(|(t, _)| *t)
                .collect();
            assert!(got.len() > 1000, "seed {seed}: client {i} got {} packets", got.len());
            for g in got.windows(2) {
                worst = worst.max(g[1].duration_since(g[0]));
            }
        }
        worst
    });
    let back = w.online_since(a).unwrap().max(w.online_since(b).unwrap());
    if std::env::var("FAILOVER_TRACE").is_ok() {
        for i in [a, b] {
            for (t, e) in &w.events[i] {
                if matches!(e, ClientEvent::Online | ClientEvent::Offline { .. }) && *t >= kill_at {
                    eprintln!("client {i} +{:?}: {e:?}", t.duration_since(kill_at));
                }
            }
        }
    }
    Outcome {
        failover: back.duration_since(kill_at),
        worst_delivery: worst,
        messages: sent.len(),
        worst_media_gap,
    }
}

fn active_on_both(w: &Fleet, who: [usize; 2], call_id: u64) -> bool {
    who.iter().all(|i| {
        w.clients[*i]
            .1
            .calls()
            .iter()
            .any(|c| c.call_id == call_id && c.state == CallState::Active)
    })
}

#[test]
fn users_of_a_killed_supernode_move_to_another_while_their_direct_session_and_call_carry_on() {
    let mut worst_failover = Duration::ZERO;
    let mut worst_delivery = Duration::ZERO;
    let mut worst_gap = Duration::ZERO;
    // Kill moments spread over a whole keepalive cycle (and more).
    for k in 0..10u64 {
        let o = failover_run(
            20 + k,
            Net::perfect(20 + k),
            Duration::from_millis(1000 * k + 370),
            true,
        );
        assert!(o.messages >= 240);
        assert!(
            o.failover <= Duration::from_secs(15),
            "kill at {k}: online on B after {:?}",
            o.failover
        );
        assert!(
            o.worst_delivery <= Duration::from_millis(500),
            "kill at {k}: a message took {:?}",
            o.worst_delivery
        );
        // The call's media never paused: one packet every 20 ms throughout.
        let gap = o.worst_media_gap.unwrap();
        assert!(
            gap <= Duration::from_millis(25),
            "kill at {k}: media paused {gap:?}"
        );
        worst_failover = worst_failover.max(o.failover);
        worst_delivery = worst_delivery.max(o.worst_delivery);
        worst_gap = worst_gap.max(gap);
    }
    println!(
        "worst failover {worst_failover:?}, worst direct delivery {worst_delivery:?}, \
         worst media gap {worst_gap:?}"
    );
}

#[test]
fn failover_under_loss_duplication_and_reordering_loses_no_direct_message() {
    for seed in 0..12 {
        let o = failover_run(
            40 + seed,
            Net::lossy(40 + seed, 0.05, 0.05, Duration::from_millis(30)),
            Duration::from_millis(4000 + 2100 * seed),
            false,
        );
        assert!(
            o.failover <= Duration::from_secs(15),
            "seed {seed}: online on B after {:?}",
            o.failover
        );
        // Lost datagrams are retransmitted (400 ms, then 800 ms, ...).
        assert!(
            o.worst_delivery <= Duration::from_secs(3),
            "seed {seed}: a message took {:?}",
            o.worst_delivery
        );
        println!(
            "lossy seed {seed}: failover {:?}, worst direct delivery {:?}",
            o.failover, o.worst_delivery
        );
    }
}
