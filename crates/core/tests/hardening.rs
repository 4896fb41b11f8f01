//! Hardening on virtual time: handshake cookies under load, half-open expiry, rate limits,
//! wrong-password backoff, revocation and freshness at login, and a privacy attack by a
//! stranger that must not learn the victim's address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_core::client::{Client, ClientConfig, ClientEvent, Command, CommandResult};
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::limit::Rate;
use peerline_core::link::{Link, LinkConfig, LinkEvent, Transmit};
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::store::Store;
use peerline_core::supernode::{DropReason, Limits, Supernode, SupernodeConfig};
use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::noise::Handshake;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_wire::msg::{ContactAction, ErrorCode, Presence, Request, Response};
use peerline_wire::packet::{Packet, RejectReason};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const UNIX_START_MS: u64 = 1_790_000_000_000;

fn sn_addr() -> SocketAddr {
    "203.0.113.1:7000".parse().unwrap()
}

fn user(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// One supernode, clients on a perfect network (delivered at the next step), storage
/// operations run synchronously.
struct World {
    now: Instant,
    t0: Instant,
    sn: Supernode,
    sn_keys: DeviceKeys,
    authority: [u8; 32],
    store: MemoryStore,
    rng: ChaCha20Rng,
    clients: Vec<(SocketAddr, Client)>,
    events: Vec<Vec<ClientEvent>>,
    /// Datagrams the supernode sent to addresses that are no client (spoofed sources).
    elsewhere: Vec<Transmit>,
    in_flight: Vec<(SocketAddr, Transmit)>,
    /// Every datagram delivered: (time, source, destination, bytes).
    log: Vec<(Instant, SocketAddr, SocketAddr, Vec<u8>)>,
}

impl World {
    fn new(limits: Limits) -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let authority = Authority::generate(&mut rng).to_bytes();
        Self::with_keys(limits, sn_keys, authority, [7; 32], rng)
    }

    fn with_keys(
        limits: Limits,
        sn_keys: DeviceKeys,
        authority: [u8; 32],
        sn_seed: [u8; 32],
        rng: ChaCha20Rng,
    ) -> Self {
        let cfg = SupernodeConfig {
            limits,
            ..SupernodeConfig::default()
        };
        Self::with_config(cfg, sn_keys, authority, sn_seed, rng)
    }

    fn with_config(
        cfg: SupernodeConfig,
        sn_keys: DeviceKeys,
        authority: [u8; 32],
        sn_seed: [u8; 32],
        rng: ChaCha20Rng,
    ) -> Self {
        let t0 = Instant::now();
        let sn = Supernode::new(
            cfg,
            sn_keys.noise_private(),
            Authority::from_bytes(&authority),
            sn_seed,
            Box::new(MemoryDirectory::new()),
            WallClock::new(t0, UNIX_START_MS),
            t0,
        );
        World {
            now: t0,
            t0,
            sn,
            sn_keys,
            authority,
            store: MemoryStore::new(),
            rng,
            clients: Vec::new(),
            events: Vec::new(),
            elsewhere: Vec::new(),
            in_flight: Vec::new(),
            log: Vec::new(),
        }
    }

    fn add_client_at(
        &mut self,
        addr: SocketAddr,
        cert: Option<Vec<u8>>,
        keys: Option<DeviceKeys>,
        skew_ms: i64,
        relay_only: bool,
    ) -> usize {
        let i = self.clients.len();
        let keys = keys.unwrap_or_else(|| DeviceKeys::generate(&mut self.rng));
        let mut cfg = ClientConfig::new(
            sn_addr(),
            self.sn_keys.noise_public(),
            Authority::from_bytes(&self.authority).public(),
        );
        cfg.relay_only = relay_only;
        let elapsed = self.now.duration_since(self.t0).as_millis() as i64;
        let mut c = Client::new(
            cfg,
            keys,
            cert.as_deref(),
            [i as u8 + 1; 32],
            WallClock::new(self.now, (UNIX_START_MS as i64 + elapsed + skew_ms) as u64),
            self.now,
        );
        c.set_local_candidates(vec![addr]);
        c.connect(self.now);
        self.clients.push((addr, c));
        self.events.push(Vec::new());
        i
    }

    fn add_client(&mut self) -> usize {
        let i = self.clients.len();
        let addr = format!("198.51.100.{}:{}", i + 10, 5000 + i)
            .parse()
            .unwrap();
        self.add_client_at(addr, None, None, 0, false)
    }

    fn step(&mut self) {
        let now = self.now;
        while let Some((token, op)) = self.sn.poll_op() {
            let r = execute(&mut self.store, op, &mut self.rng);
            self.sn.handle_op_result(now, token, r);
        }
        while let Some(t) = self.sn.poll_transmit() {
            if self.clients.iter().any(|(a, _)| *a == t.dst) {
                self.in_flight.push((sn_addr(), t));
            } else {
                self.elsewhere.push(t);
            }
        }
        for (i, (addr, c)) in self.clients.iter_mut().enumerate() {
            while let Some(t) = c.poll_transmit() {
                self.in_flight.push((*addr, t));
            }
            while let Some(e) = c.poll_event() {
                if let ClientEvent::Message { token, .. } = &e {
                    c.message_saved(now, *token);
                }
                self.events[i].push(e);
            }
        }
        for (from, t) in std::mem::take(&mut self.in_flight) {
            self.log.push((now, from, t.dst, t.payload.clone()));
            if t.dst == sn_addr() {
                self.sn.handle_datagram(now, from, &t.payload);
            } else if let Some(i) = self.clients.iter().position(|(a, _)| *a == t.dst) {
                self.clients[i].1.handle_datagram(now, from, &t.payload);
            }
        }
        self.now += Duration::from_millis(5);
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

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.step();
        }
    }

    fn command(&mut self, i: usize, cmd: Command) -> CommandResult {
        let id = self.clients[i].1.command(self.now, cmd);
        let end = self.now + Duration::from_secs(60);
        while self.now < end {
            self.step();
            if let Some(r) = self.events[i].iter().find_map(|e| match e {
                ClientEvent::CommandDone { id: d, result } if *d == id => Some(result.clone()),
                _ => None,
            }) {
                return r;
            }
        }
        panic!("command {id} of client {i} did not finish");
    }

    fn register(&mut self, i: usize, name: &str) {
        let r = self.command(
            i,
            Command::Register {
                username: user(name),
                password: "correct horse".into(),
            },
        );
        assert_eq!(r, CommandResult::Ok, "register {name}");
    }

    fn befriend(&mut self, a: usize, an: &str, b: usize, bn: &str) {
        let r = self.command(
            a,
            Command::ContactAdd {
                user: user(bn),
                note: String::new(),
            },
        );
        assert_eq!(r, CommandResult::Ok);
        let r = self.command(
            b,
            Command::ContactReply {
                user: user(an),
                action: ContactAction::Accept,
            },
        );
        assert_eq!(r, CommandResult::Ok);
    }

    /// A handshake initiation as a client would send it, from fresh keys.
    fn initiation(
        &mut self,
        cert: Option<Vec<u8>>,
        keys: &DeviceKeys,
        unix_ms: u64,
    ) -> (Handshake, Vec<u8>, u32) {
        let sn_public = self.sn_keys.noise_public();
        support::initiation(&mut self.rng, keys, &sn_public, cert, unix_ms)
    }

    fn unix_ms(&self) -> u64 {
        UNIX_START_MS + self.now.duration_since(self.t0).as_millis() as u64
    }

    fn error_code(r: &CommandResult) -> Option<ErrorCode> {
        match r {
            CommandResult::Error { code, .. } => Some(*code),
            _ => None,
        }
    }
}

fn spoofed(i: u32) -> SocketAddr {
    SocketAddr::new(
        std::net::Ipv4Addr::from(0x0a00_0000 | i).into(),
        1024 + (i % 60_000) as u16,
    )
}

#[test]
fn an_initiation_with_a_wrong_mac1_is_dropped_before_any_work() {
    let mut w = World::new(Limits::default());
    let keys = DeviceKeys::generate(&mut w.rng);
    let (_, mut p, _) = w.initiation(None, &keys, w.unix_ms());
    let n = p.len();
    p[n - 20] ^= 1; // inside mac1
    w.sn.handle_datagram(w.now, spoofed(1), &p);
    assert_eq!(w.sn.stats().drops_for(DropReason::BadMac), 1);
    assert_eq!(w.sn.session_count(), 0);
    assert!(w.sn.poll_transmit().is_none(), "nothing answers a bad mac1");
}

#[test]
fn under_load_an_initiation_without_a_cookie_costs_no_diffie_hellman() {
    // Garbage Noise with a valid mac1: without load the supernode runs the Noise read
    // (Diffie-Hellman) and fails; under load it answers with a cookie and never gets there.
    let garbage = cookie::encode_init(
        5,
        &[0x42; 120],
        &MacKeys::new(&World::new(Limits::default()).sn_keys.noise_public()),
        None,
    );
    let mut calm = World::new(Limits::default());
    calm.sn.handle_datagram(calm.now, spoofed(1), &garbage);
    assert_eq!(calm.sn.stats().drops_for(DropReason::BadHandshake), 1);
    assert_eq!(calm.sn.stats().cookies_sent, 0);

    let mut loaded = World::new(Limits {
        load_handshakes_per_second: 0,
        ..Limits::default()
    });
    loaded.sn.handle_datagram(loaded.now, spoofed(1), &garbage);
    assert_eq!(loaded.sn.stats().drops_for(DropReason::BadHandshake), 0);
    assert_eq!(loaded.sn.stats().drops_for(DropReason::CookieRequired), 1);
    assert_eq!(loaded.sn.stats().cookies_sent, 1);
    let reply = loaded.sn.poll_transmit().unwrap();
    assert_eq!(reply.dst, spoofed(1));
    assert!(reply.payload.len() < garbage.len(), "no amplification");
    assert!(matches!(
        Packet::decode(&reply.payload),
        Ok(Packet::CookieReply { receiver: 5, .. })
    ));
}

#[test]
fn a_client_logs_in_through_a_cookie_when_the_supernode_is_under_load() {
    let mut w = World::new(Limits {
        load_handshakes_per_second: 0,
        ..Limits::default()
    });
    let a = w.add_client();
    w.register(a, "alice");
    assert!(w.clients[a].1.is_online());
    assert!(w.sn.stats().cookies_sent >= 1);
    let b = w.add_client();
    w.register(b, "bob");
    w.befriend(a, "alice", b, "bob");
    let r = w.command(
        a,
        Command::SendMessage {
            to: user("bob"),
            text: "through the cookie".into(),
        },
    );
    assert!(matches!(r, CommandResult::Sent { .. }), "{r:?}");
}

#[test]
fn a_spoofed_handshake_flood_leaves_bounded_state_and_legitimate_logins() {
    let limits = Limits {
        load_half_open: 50,
        ..Limits::default()
    };
    let mut w = World::new(limits);
    // Valid anonymous initiations (each would open a registration session) from 2,000
    // spoofed sources that never answer.
    let keys = DeviceKeys::generate(&mut w.rng);
    let flood: Vec<Vec<u8>> = (0..2000)
        .map(|_| w.initiation(None, &keys, UNIX_START_MS).1)
        .collect();
    let a = w.add_client();
    for (i, p) in flood.iter().enumerate() {
        w.sn.handle_datagram(w.now, spoofed(i as u32), p);
        if i % 100 == 0 {
            w.step();
        }
    }
    assert!(
        w.sn.half_open_count() <= 51,
        "half-open sessions capped by the load threshold: {}",
        w.sn.half_open_count()
    );
    assert!(w.sn.stats().cookies_sent >= 1900);
    // The legitimate client logs in meanwhile (it answers its cookie).
    w.register(a, "alice");
    assert!(w.clients[a].1.is_online());
    // The flood's sessions expire; the legitimate one stays.
    w.run_for(Duration::from_secs(11));
    assert_eq!(w.sn.session_count(), 1);
    assert_eq!(w.sn.half_open_count(), 0);
    let expired = w.sn.stats().drops_for(DropReason::HalfOpenExpired);
    assert_eq!(
        expired,
        w.sn.stats().handshakes - 1,
        "every flood session expired"
    );
    assert!(w.clients[a].1.is_online());
}

#[test]
fn a_mass_expiry_is_handled_a_budget_at_a_time() {
    let cfg = SupernodeConfig {
        timer_budget: 10,
        ..SupernodeConfig::default()
    };
    let mut rng = ChaCha20Rng::seed_from_u64(9);
    let sn_keys = DeviceKeys::generate(&mut rng);
    let authority = Authority::generate(&mut rng).to_bytes();
    let mut w = World::with_config(cfg, sn_keys, authority, [9; 32], rng);
    // 35 half-open sessions from sources that never answer, all due at once.
    let keys = DeviceKeys::generate(&mut w.rng);
    for i in 0..35 {
        let (_, p, _) = w.initiation(None, &keys, UNIX_START_MS);
        w.sn.handle_datagram(w.now, spoofed(i), &p);
    }
    assert_eq!(w.sn.half_open_count(), 35);
    let later = w.now + Duration::from_secs(11);
    let expired = |w: &World| w.sn.stats().drops_for(DropReason::HalfOpenExpired);
    for call in 1..=3 {
        w.sn.handle_timeout(later);
        assert_eq!(
            expired(&w),
            10 * call,
            "call {call} handles its budget only"
        );
        assert!(
            w.sn.poll_timeout().is_some_and(|t| t <= later),
            "the rest is still due: the driver comes back"
        );
    }
    w.sn.handle_timeout(later);
    assert_eq!(expired(&w), 35);
    assert_eq!(w.sn.session_count(), 0);
    assert!(w.sn.poll_timeout().is_none_or(|t| t > later));
}

#[test]
fn a_stun_binding_is_answered_into_the_callers_buffer() {
    let mut w = World::new(Limits::default());
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(&[5; 12]);
    let mut out = [0u8; peerline_core::stun::ANSWER_MAX];
    let n =
        w.sn.handle_datagram_into(w.now, spoofed(1), &req, &mut out)
            .expect("answered in place");
    assert_eq!(
        Some(out[..n].to_vec()),
        peerline_core::stun::answer(&req, spoofed(1))
    );
    assert!(w.sn.poll_transmit().is_none(), "nothing queued besides");
    assert_eq!(w.sn.stats().stun, 1);
    assert_eq!(w.sn.stats().datagrams_out, 1);
    // Anything else takes the ordinary path: a wrong mac1 is dropped, nothing written.
    let keys = DeviceKeys::generate(&mut w.rng);
    let unix_ms = w.unix_ms();
    let (_, mut p, _) = w.initiation(None, &keys, unix_ms);
    let len = p.len();
    p[len - 20] ^= 1;
    assert_eq!(
        w.sn.handle_datagram_into(w.now, spoofed(2), &p, &mut out),
        None
    );
    assert_eq!(w.sn.stats().drops_for(DropReason::BadMac), 1);
}

#[test]
fn a_noisy_source_gets_few_cookie_replies() {
    let mut w = World::new(Limits {
        load_handshakes_per_second: 0,
        ..Limits::default()
    });
    let keys = MacKeys::new(&w.sn_keys.noise_public());
    for i in 0..1000u32 {
        let p = cookie::encode_init(i | 1, &[i as u8; 113], &keys, None);
        w.sn.handle_datagram(w.now, spoofed(1), &p);
    }
    // The burst of 10, then nothing more within the same instant.
    assert_eq!(w.sn.stats().cookies_sent, 10);
    assert_eq!(w.sn.stats().drops_for(DropReason::CookieRequired), 1000);
    // Another source is unaffected.
    let p = cookie::encode_init(3, &[1; 113], &keys, None);
    w.sn.handle_datagram(w.now, spoofed(2), &p);
    assert_eq!(w.sn.stats().cookies_sent, 11);
}

#[test]
fn a_stale_hello_is_rejected_with_a_reason_the_user_sees() {
    let mut w = World::new(Limits::default());
    let addr = "198.51.100.77:5000".parse().unwrap();
    let c = w.add_client_at(addr, None, None, -11 * 60 * 1000, false);
    w.run_for(Duration::from_secs(2));
    assert!(!w.clients[c].1.is_online());
    assert!(w.sn.stats().drops_for(DropReason::Stale) >= 1);
    assert!(w.events[c]
        .iter()
        .any(|e| matches!(e, ClientEvent::Offline { reason } if reason.contains("clock"))));
}

#[test]
fn a_replayed_initiation_is_refused_once_stale() {
    let mut w = World::new(Limits::default());
    let keys = DeviceKeys::generate(&mut w.rng);
    let (_, p, index) = w.initiation(None, &keys, w.unix_ms());
    w.run_for(Duration::from_secs(301));
    w.sn.handle_datagram(w.now, spoofed(3), &p);
    assert_eq!(w.sn.session_count(), 0);
    let t = w.sn.poll_transmit().unwrap();
    assert_eq!(
        Packet::decode(&t.payload),
        Ok(Packet::Reject {
            receiver: index,
            reason: RejectReason::Stale,
            version: PROTOCOL_VERSION
        })
    );
}

#[test]
fn another_versions_handshake_gets_a_reject_naming_ours() {
    let mut w = World::new(Limits::default());
    let keys = DeviceKeys::generate(&mut w.rng);
    let (_, mut p, index) = w.initiation(None, &keys, w.unix_ms());
    p[1] = 2;
    w.sn.handle_datagram(w.now, spoofed(4), &p);
    assert_eq!(w.sn.stats().drops_for(DropReason::Version), 1);
    let t = w.sn.poll_transmit().unwrap();
    assert_eq!(t.payload.len(), 12);
    assert_eq!(
        Packet::decode(&t.payload),
        Ok(Packet::Reject {
            receiver: index,
            reason: RejectReason::Version,
            version: PROTOCOL_VERSION
        })
    );
}

/// A world with bob registered from `addr` with device keys of his own (returned, with
/// his client's index), for the revocation tests.
fn bob_with_keys(addr: SocketAddr) -> (World, usize, DeviceKeys) {
    let mut w = World::new(Limits::default());
    let keys = DeviceKeys::generate(&mut ChaCha20Rng::seed_from_u64(9));
    let b = w.add_client_at(addr, None, Some(keys.clone()), 0, false);
    w.register(b, "bob");
    (w, b, keys)
}

#[test]
fn a_revoked_device_cannot_log_in_with_a_valid_certificate() {
    let addr: SocketAddr = "198.51.100.20:5000".parse().unwrap();
    let (mut w, b, keys) = bob_with_keys(addr);
    let cert = w.clients[b].1.certificate().unwrap().to_bytes();
    let now = w.now;
    w.clients[b].1.shutdown(now);
    w.step();
    w.clients.clear();
    w.events.clear();
    w.store.revoke_device(&keys.noise_public()).unwrap();
    let b2 = w.add_client_at(addr, Some(cert), Some(keys), 0, false);
    w.run_for(Duration::from_secs(3));
    assert!(!w.clients[b2].1.is_online());
    assert_eq!(w.sn.online_count(), 0);
    assert!(w.sn.stats().drops_for(DropReason::Revoked) >= 1);
    assert!(w.events[b2]
        .iter()
        .any(|e| matches!(e, ClientEvent::Offline { reason } if reason.contains("revoked"))));
}

/// Revoked while logged in: the operator's recheck logs the device out at once and tells
/// it why; a recheck of a device that is not revoked, or of another device, changes nothing.
#[test]
fn a_device_revoked_while_online_is_logged_out_when_the_operator_asks() {
    let (mut w, b, keys) = bob_with_keys("198.51.100.21:5000".parse().unwrap());
    w.run_for(Duration::from_secs(1));
    assert!(w.clients[b].1.is_online());
    let key = keys.noise_public();
    // Not revoked yet, and a key that is not bob's: nothing happens.
    assert!(w.sn.recheck_device(&user("bob"), &key));
    assert!(!w.sn.recheck_device(&user("bob"), &[7; 32]));
    assert!(!w.sn.recheck_device(&user("nobody"), &key));
    w.run_for(Duration::from_secs(1));
    assert!(w.clients[b].1.is_online());
    assert_eq!(w.sn.online_count(), 1);

    w.store.revoke_device(&key).unwrap();
    assert!(w.sn.recheck_device(&user("bob"), &key));
    w.run_for(Duration::from_secs(1));
    assert_eq!(w.sn.online_count(), 0);
    assert!(!w.clients[b].1.is_online());
    assert!(w.events[b]
        .iter()
        .any(|e| matches!(e, ClientEvent::Offline { reason } if reason.contains("revoked"))));
}

#[test]
fn wrong_passwords_back_off_per_account_without_hashing() {
    let mut w = World::new(Limits {
        free_password_failures: 3,
        ..Limits::default()
    });
    let a = w.add_client();
    w.register(a, "alice");
    let m = w.add_client();
    let enroll = |w: &mut World| {
        w.command(
            m,
            Command::Enroll {
                username: user("alice"),
                password: "wrong password".into(),
            },
        )
    };
    for _ in 0..4 {
        assert_eq!(
            World::error_code(&enroll(&mut w)),
            Some(ErrorCode::WrongPassword)
        );
    }
    // The fourth failure set a wait: the next attempt is refused before any Argon2 work.
    let r = enroll(&mut w);
    assert_eq!(World::error_code(&r), Some(ErrorCode::RateLimited), "{r:?}");
    assert!(w.sn.stats().rate_limited >= 1);
}

#[test]
fn searches_contact_requests_and_messages_are_rate_limited_per_account() {
    let mut w = World::new(Limits {
        searches_per_account: Rate::new(5, 0.001),
        contact_requests_per_account: Rate::new(3, 0.001),
        ..Limits::default()
    });
    let a = w.add_client();
    w.register(a, "alice");
    let mut results = Vec::new();
    for _ in 0..7 {
        results.push(w.command(
            a,
            Command::Search {
                prefix: "al".into(),
            },
        ));
    }
    assert!(results[..5]
        .iter()
        .all(|r| matches!(r, CommandResult::Users(_))));
    assert!(results[5..]
        .iter()
        .all(|r| World::error_code(r) == Some(ErrorCode::RateLimited)));
    for i in 0..5 {
        let b = w.add_client();
        w.register(b, &format!("bob{i}"));
    }
    let codes: Vec<_> = (0..5)
        .map(|i| {
            let r = w.command(
                a,
                Command::ContactAdd {
                    user: user(&format!("bob{i}")),
                    note: "hi".into(),
                },
            );
            World::error_code(&r)
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            None,
            None,
            None,
            Some(ErrorCode::RateLimited),
            Some(ErrorCode::RateLimited)
        ]
    );
}

#[test]
fn a_repeated_contact_request_notifies_the_recipient_once() {
    let mut w = World::new(Limits::default());
    let a = w.add_client();
    w.register(a, "alice");
    let b = w.add_client();
    w.register(b, "bob");
    for _ in 0..5 {
        let r = w.command(
            a,
            Command::ContactAdd {
                user: user("bob"),
                note: "please".into(),
            },
        );
        assert_eq!(r, CommandResult::Ok);
    }
    w.run_for(Duration::from_secs(1));
    let told = w.events[b]
        .iter()
        .filter(|e| matches!(e, ClientEvent::Contact { .. }))
        .count();
    assert_eq!(told, 1);
}

#[test]
fn a_full_mailbox_is_a_clear_error_for_the_sender() {
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let sn_keys = DeviceKeys::generate(&mut rng);
    let authority = Authority::generate(&mut rng).to_bytes();
    let cfg = SupernodeConfig {
        mailbox_quota: 2,
        ..SupernodeConfig::default()
    };
    let mut w = World::with_config(cfg, sn_keys, authority, [7; 32], rng);
    let a = w.add_client();
    w.register(a, "alice");
    let b = w.add_client();
    w.register(b, "bob");
    w.befriend(a, "alice", b, "bob");
    let now = w.now;
    w.clients[b].1.shutdown(now);
    w.run_for(Duration::from_secs(1));
    let mut results = Vec::new();
    for i in 0..3 {
        results.push(w.command(
            a,
            Command::SendMessage {
                to: user("bob"),
                text: format!("message {i}"),
            },
        ));
    }
    assert!(results[..2]
        .iter()
        .all(|r| matches!(r, CommandResult::Sent { .. })));
    match &results[2] {
        CommandResult::Error { code, detail } => {
            assert_eq!(*code, ErrorCode::MailboxFull);
            assert!(detail.contains("mailbox is full"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}

/// Every byte pattern under which `addr` could appear in what an attacker receives.
fn needles(addr: SocketAddr) -> Vec<Vec<u8>> {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        unreachable!()
    };
    let port = addr.port();
    let mut varint = Vec::new();
    let mut p = port as u32;
    loop {
        if p < 0x80 {
            varint.push(p as u8);
            break;
        }
        varint.push((p as u8 & 0x7f) | 0x80);
        p >>= 7;
    }
    let mut postcard = ip.octets().to_vec();
    postcard.extend_from_slice(&varint);
    vec![
        ip.octets().to_vec(),
        ip.to_string().into_bytes(),
        port.to_string().into_bytes(),
        port.to_be_bytes().to_vec(),
        port.to_le_bytes().to_vec(),
        postcard,
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// A hand-driven client session: the attacker sees every decrypted byte.
struct RawSession {
    addr: SocketAddr,
    link: Link,
    /// Everything received: raw datagrams, and each decrypted frame's postcard bytes and
    /// debug text.
    seen: Vec<Vec<u8>>,
    answers: Vec<Response>,
}

impl RawSession {
    fn login(w: &mut World, addr: SocketAddr, keys: &DeviceKeys, cert: Vec<u8>) -> RawSession {
        let (hs, p, index) = w.initiation(Some(cert), keys, w.unix_ms());
        w.sn.handle_datagram(w.now, addr, &p);
        let mut seen = Vec::new();
        let mut link = None;
        while let Some(t) = w.sn.poll_transmit() {
            assert_eq!(t.dst, addr);
            seen.push(t.payload.clone());
            if let Ok(Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            }) = Packet::decode(&t.payload)
            {
                assert_eq!(receiver, index);
                let (transport, _) = hs.finish(noise).unwrap();
                link = Some(Link::new(
                    LinkConfig::client(),
                    transport,
                    index,
                    sender,
                    sn_addr(),
                    w.now,
                ));
                break;
            }
        }
        RawSession {
            addr,
            link: link.expect("logged in"),
            seen,
            answers: Vec::new(),
        }
    }

    /// Sends `body` and runs the world until it is answered.
    fn ask(&mut self, w: &mut World, body: Request) -> Response {
        let id = self.link.send_request(w.now, body).unwrap();
        let end = w.now + Duration::from_secs(20);
        while w.now < end {
            while let Some(t) = self.link.poll_transmit() {
                w.sn.handle_datagram(w.now, self.addr, &t.payload);
            }
            w.step();
            let mine: Vec<Transmit> = std::mem::take(&mut w.elsewhere)
                .into_iter()
                .filter(|t| t.dst == self.addr)
                .collect();
            for t in mine {
                self.seen.push(t.payload.clone());
                if let Ok(Packet::Transport {
                    receiver,
                    counter,
                    ciphertext,
                }) = Packet::decode(&t.payload)
                {
                    assert_eq!(receiver, self.link.local_index());
                    self.link
                        .handle_transport(w.now, sn_addr(), counter, ciphertext)
                        .unwrap();
                }
            }
            while let Some(e) = self.link.poll_event() {
                self.seen.push(format!("{e:?}").into_bytes());
                match e {
                    LinkEvent::Response { id: got, body } => {
                        self.seen.push(
                            peerline_wire::msg::Frame::Response {
                                id: got,
                                body: body.clone(),
                            }
                            .encode()
                            .unwrap(),
                        );
                        if got == id {
                            self.answers.push(body.clone());
                            return body;
                        }
                    }
                    LinkEvent::Request { id: rid, body } => {
                        self.seen.push(
                            peerline_wire::msg::Frame::Request {
                                id: rid,
                                body: body.clone(),
                            }
                            .encode()
                            .unwrap(),
                        );
                        let _ = self.link.respond(w.now, rid, Response::Ok);
                    }
                    _ => {}
                }
            }
        }
        panic!("no answer");
    }

    fn leaks(&self, addr: SocketAddr) -> Vec<String> {
        let mut found = Vec::new();
        for n in needles(addr) {
            for s in &self.seen {
                if contains(s, &n) {
                    found.push(format!("{n:?} in {}", String::from_utf8_lossy(s)));
                }
            }
        }
        found
    }
}

/// An online victim, and an attacker with an account of their own who is not the victim's
/// contact (they sent a request the victim never accepted).
fn victim_and_attacker(relay_only: bool) -> (World, SocketAddr, RawSession) {
    let mut w = World::new(Limits::default());
    // Addresses chosen so that no byte pattern of them appears by chance elsewhere.
    let victim_addr: SocketAddr = "100.91.177.203:47731".parse().unwrap();
    let v = w.add_client_at(victim_addr, None, None, 0, relay_only);
    w.register(v, "victim");
    let attacker_addr: SocketAddr = "198.18.5.9:6001".parse().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let keys = DeviceKeys::generate(&mut rng);
    let m = w.add_client_at(attacker_addr, None, Some(keys.clone()), 0, false);
    w.register(m, "mallory");
    let cert = w.clients[m].1.certificate().unwrap().to_bytes();
    let now = w.now;
    w.clients[m].1.shutdown(now);
    w.step();
    w.clients.truncate(1);
    w.events.truncate(1);
    w.run_for(Duration::from_millis(100));
    let raw = RawSession::login(&mut w, attacker_addr, &keys, cert);
    (w, victim_addr, raw)
}

#[test]
fn a_stranger_learns_no_address_of_an_online_victim_from_any_request() {
    let (mut w, victim_addr, mut m) = victim_and_attacker(false);
    let victim = user("victim");
    // Search, presence (contact list), contact request, connection setup, offline message,
    // relay credentials, and requests only a supernode may send.
    let r = m.ask(
        &mut w,
        Request::Search {
            prefix: "vic".into(),
        },
    );
    assert_eq!(
        r,
        Response::SearchResults {
            users: vec![victim.clone()]
        }
    );
    let r = m.ask(
        &mut w,
        Request::ContactAdd {
            user: victim.clone(),
            note: "let me in".into(),
        },
    );
    assert_eq!(r, Response::Ok);
    m.ask(&mut w, Request::ContactList { offset: 0 });
    m.ask(&mut w, Request::SetPresence(Presence::Online));
    let r = m.ask(
        &mut w,
        Request::Connect {
            user: victim.clone(),
            candidates: vec!["198.18.5.9:6001".parse().unwrap()],
            hard_nat: false,
        },
    );
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotContact,
                ..
            }
        ),
        "{r:?}"
    );
    let r = m.ask(
        &mut w,
        Request::StoreMessage {
            to: victim.clone(),
            msg_id: 1,
            sent_at: 1,
            text: "hello".into(),
        },
    );
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotContact,
                ..
            }
        ),
        "{r:?}"
    );
    m.ask(&mut w, Request::RelayCredentials);
    // Calls: ringing a stranger is refused as if the victim were offline or unknown, and
    // signals for a call that does not exist go nowhere.
    let r = m.ask(
        &mut w,
        Request::CallInvite {
            user: victim.clone(),
            call_id: 99,
        },
    );
    assert!(
        matches!(
            r,
            Response::Error {
                code: ErrorCode::NotContact,
                ..
            }
        ),
        "{r:?}"
    );
    for signal in [
        peerline_wire::msg::CallSignal::Accept,
        peerline_wire::msg::CallSignal::HangUp,
    ] {
        let r = m.ask(
            &mut w,
            Request::CallSignal {
                user: victim.clone(),
                call_id: 99,
                signal,
            },
        );
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
    }
    m.ask(&mut w, Request::SetCallPolicy { anyone: true });
    for body in [
        Request::IncomingConnect {
            user: victim.clone(),
            cert: Vec::new(),
            candidates: Vec::new(),
            hard_nat: false,
            call_only: false,
        },
        Request::PresenceEvent {
            user: victim.clone(),
            presence: Presence::Online,
        },
        Request::Chat {
            msg_id: 1,
            sent_at: 1,
            text: "x".into(),
        },
    ] {
        let r = m.ask(&mut w, body);
        assert!(matches!(r, Response::Error { .. }), "{r:?}");
    }
    // The victim, meanwhile, is online and was told about the request.
    assert!(w.clients[0].1.is_online());
    assert!(m.answers.len() >= 10);
    let leaks = m.leaks(victim_addr);
    assert!(
        leaks.is_empty(),
        "the attacker saw the victim's address: {leaks:?}"
    );
}

#[test]
fn the_address_scan_finds_an_address_a_contact_is_given() {
    // Control: the same scan on a mutual contact's connection setup does find the
    // victim's address, so the scan is able to see one.
    let (mut w, victim_addr, mut m) = victim_and_attacker(false);
    let r = m.ask(
        &mut w,
        Request::ContactAdd {
            user: user("victim"),
            note: String::new(),
        },
    );
    assert_eq!(r, Response::Ok);
    let r = w.command(
        0,
        Command::ContactReply {
            user: user("mallory"),
            action: ContactAction::Accept,
        },
    );
    assert_eq!(r, CommandResult::Ok);
    let r = m.ask(
        &mut w,
        Request::Connect {
            user: user("victim"),
            candidates: Vec::new(),
            hard_nat: false,
        },
    );
    assert!(matches!(r, Response::ConnectAccepted { .. }), "{r:?}");
    assert!(!m.leaks(victim_addr).is_empty());
}

#[test]
fn a_relay_only_victim_gives_no_address_even_to_a_contact() {
    let (mut w, victim_addr, mut m) = victim_and_attacker(true);
    m.ask(
        &mut w,
        Request::ContactAdd {
            user: user("victim"),
            note: String::new(),
        },
    );
    w.command(
        0,
        Command::ContactReply {
            user: user("mallory"),
            action: ContactAction::Accept,
        },
    );
    let r = m.ask(
        &mut w,
        Request::Connect {
            user: user("victim"),
            candidates: Vec::new(),
            hard_nat: false,
        },
    );
    // Relay-only without a relay: no connection setup at all, or one without addresses.
    if let Response::ConnectAccepted { candidates, .. } = &r {
        assert!(!candidates.contains(&victim_addr));
    }
    let leaks = m.leaks(victim_addr);
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// Writes fuzz seed corpora from this traffic (run by hand; the corpora are committed):
/// `PEERLINE_CORPUS_DIR=$PWD/fuzz/seeds cargo test -p peerline-core --test hardening \
///  -- --ignored write_fuzz_corpus`. The supernode has the keys the fuzz targets use, so
/// the captured sessions replay past Noise there.
#[test]
#[ignore = "writes files; run by hand"]
fn write_fuzz_corpus() {
    use peerline_wire::msg::Frame;
    let dir = std::path::PathBuf::from(
        std::env::var("PEERLINE_CORPUS_DIR").expect("PEERLINE_CORPUS_DIR"),
    );
    let mut w = World::with_keys(
        Limits::default(),
        DeviceKeys::from_bytes(&[9; 64]),
        Authority::from_bytes(&[3; 32]).to_bytes(),
        [5; 32],
        ChaCha20Rng::seed_from_u64(1),
    );
    let at = |i: u8| -> SocketAddr { SocketAddr::from(([198, 51, 100, i], 4000)) };
    let a = w.add_client_at(at(0), None, None, 0, false);
    let b = w.add_client_at(at(1), None, None, 0, false);
    w.register(a, "alice");
    w.register(b, "bob");
    w.befriend(a, "alice", b, "bob");
    w.command(a, Command::Search { prefix: "b".into() });
    w.command(a, Command::ContactList);
    w.command(a, Command::SetPresence(Presence::Away));
    w.command(
        b,
        Command::SendMessage {
            to: user("alice"),
            text: "hello alice".into(),
        },
    );
    w.command(
        a,
        Command::SendMessage {
            to: user("carol"),
            text: "nobody".into(),
        },
    );
    w.command(a, Command::ContactRemove { user: user("bob") });
    w.run_for(Duration::from_secs(30));
    let write = |sub: &str, name: String, bytes: &[u8]| {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    // packet: every distinct datagram, both directions.
    let mut seen = std::collections::HashSet::new();
    for (_, _, _, p) in &w.log {
        if seen.insert(p.clone()) && seen.len() <= 200 {
            write("packet", format!("real-{:03}", seen.len()), p);
        }
    }
    // supernode: the whole capture towards the supernode, as [len u16][src][delay][bytes],
    // and each client's part alone.
    let seq = |filter: &dyn Fn(SocketAddr) -> bool| {
        let mut out = Vec::new();
        let mut last = w.t0;
        for (t, from, dst, p) in &w.log {
            if *dst != sn_addr() || !filter(*from) {
                continue;
            }
            let delay = (t.duration_since(last).as_millis() / 5).min(255) as u8;
            last = *t;
            let src = match from.ip() {
                std::net::IpAddr::V4(ip) => ip.octets()[3],
                _ => 0,
            };
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(&[src, delay]);
            out.extend_from_slice(p);
        }
        out
    };
    write("supernode", "real-all".into(), &seq(&|_| true));
    write("supernode", "real-alice".into(), &seq(&|f| f == at(0)));
    write("supernode", "real-bob".into(), &seq(&|f| f == at(1)));
    // client: what the supernode sent alice (source byte even = the supernode).
    let mut out = Vec::new();
    for (_, from, dst, p) in &w.log {
        if *dst == at(0) && *from == sn_addr() {
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(&[0, 1]);
            out.extend_from_slice(p);
        }
    }
    write("client", "real-alice".into(), &out);
    // frame and supernode_session: the frames of that traffic, as plaintext.
    let frames: Vec<Vec<u8>> = [
        Frame::Keepalive,
        Frame::Close,
        Frame::Request {
            id: 1,
            body: Request::Search { prefix: "b".into() },
        },
        Frame::Request {
            id: 2,
            body: Request::ContactList { offset: 0 },
        },
        Frame::Request {
            id: 3,
            body: Request::SetPresence(Presence::Away),
        },
        Frame::Request {
            id: 4,
            body: Request::ContactAdd {
                user: user("bob"),
                note: "hi".into(),
            },
        },
        Frame::Request {
            id: 5,
            body: Request::ContactReply {
                user: user("bob"),
                action: ContactAction::Accept,
            },
        },
        Frame::Request {
            id: 6,
            body: Request::Connect {
                user: user("bob"),
                candidates: vec![at(0)],
                hard_nat: false,
            },
        },
        Frame::Request {
            id: 7,
            body: Request::StoreMessage {
                to: user("bob"),
                msg_id: 9,
                sent_at: 1,
                text: "hello".into(),
            },
        },
        Frame::Request {
            id: 8,
            body: Request::ContactRemove { user: user("bob") },
        },
        Frame::Request {
            id: 9,
            body: Request::RelayCredentials,
        },
        Frame::Request {
            id: 10,
            body: Request::RenewCert,
        },
        Frame::Response {
            id: 1,
            body: Response::Ok,
        },
        Frame::Response {
            id: 2,
            body: Response::ConnectAnswer {
                candidates: vec![at(1)],
                hard_nat: false,
            },
        },
    ]
    .iter()
    .map(|f| f.encode().unwrap())
    .collect();
    let mut session = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        write("frame", format!("real-{i:02}"), f);
        session.extend_from_slice(&(f.len() as u16).to_le_bytes());
        session.extend_from_slice(&[0, 2]);
        session.extend_from_slice(f);
    }
    write("supernode_session", "real-requests".into(), &session);
    // cert: the certificates the supernode issued.
    for (i, c) in w.clients.iter().enumerate() {
        if let Some(cert) = c.1.certificate() {
            write("cert", format!("real-{i}"), &cert.to_bytes());
        }
    }
}
