//! The sans-IO supernode's per-datagram costs, driven only through its public API (no
//! socket, no store: storage operations are answered here as the store would):
//!
//! * `session_lookup`: one keepalive for a random session among N logged-in users (find the
//!   session by index, open, replay check, decode, echo), N = 1,000 and 100,000;
//! * `presence_fanout`: a user with K online contacts changes presence (decode the request,
//!   answer it, build and seal the K pushes), K = 10, 100, 1,000;
//! * `login`: one certificate login as the supernode handles it (mac1, Noise IK responder,
//!   certificate, session, directory, the storage operations it emits);
//! * `stun_binding`: a STUN Binding answered into the send buffer.
//!
//! Users log in as real clients do (certificate, Noise IK handshake, first keepalive); the
//! client side of those handshakes runs on every core. `cargo test --benches` runs each
//! benchmark once with small sizes; the large session table is built only under
//! `cargo bench`.
//!
//! `cargo bench -p peerline-core --bench supernode [-- --warm-up-time 1 --measurement-time 3]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, VecDeque};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::link::Transmit;
use peerline_core::ops::{LoginLookups, Op, OpResult};
use peerline_core::supernode::{DropReason, Limits, Supernode, SupernodeConfig};
use peerline_crypto::cert::CertRequest;
use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::noise::Handshake;
use peerline_crypto::{Authority, DeviceKeys, Transport};
use peerline_wire::msg::{Frame, Hello, Presence, Request, Response};
use peerline_wire::packet::Packet;
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

const UNIX_START_MS: u64 = 1_790_000_000_000;

/// Under `cargo bench` (cargo passes `--bench`); `cargo test --benches` does not.
fn full_size() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn username(i: usize) -> Username {
    Username::parse(&format!("user{i:07}")).unwrap()
}

/// A distinct source address per user.
fn addr(i: usize) -> SocketAddr {
    let i = i as u32;
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8),
        40_000,
    ))
}

/// A simulated client's side of its session.
struct Client {
    transport: Transport,
    /// The supernode's index for this session (what our packets carry).
    sn_index: u32,
    next_id: u64,
}

impl Client {
    fn datagram(&mut self, frame: &Frame) -> Vec<u8> {
        let plaintext = frame.encode().unwrap();
        let mut out = Packet::transport_header(self.sn_index, 0).to_vec();
        let counter = self.transport.seal(&plaintext, &mut out).unwrap();
        out[8..16].copy_from_slice(&counter.to_le_bytes());
        out
    }

    fn request(&mut self, body: Request) -> Vec<u8> {
        self.next_id += 1;
        self.datagram(&Frame::Request {
            id: self.next_id,
            body,
        })
    }
}

/// A login prepared on the client side: its handshake and initiation datagram.
struct Prepared {
    user: usize,
    hs: Handshake,
    init: Vec<u8>,
}

/// One supernode and the clients logged in to it, on a frozen clock: no timer is due, so
/// every figure is the cost of the datagram alone.
struct World {
    sn: Supernode,
    now: Instant,
    authority: Authority,
    sn_public: [u8; 32],
    mac_keys: MacKeys,
    clients: HashMap<usize, Client>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Who each user's mutually accepted contacts are (the store's `Accepted` answer).
    contacts: HashMap<usize, Vec<usize>>,
}

impl World {
    fn new() -> Self {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let authority = Authority::generate(&mut rng);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let now = Instant::now();
        let cfg = SupernodeConfig {
            // Every login comes at the same instant of the frozen clock: per-second rates
            // would take that for a flood.
            limits: Limits::off(),
            ..SupernodeConfig::default()
        };
        let sn = Supernode::new(
            cfg,
            sn_keys.noise_private(),
            Authority::from_bytes(&authority.to_bytes()),
            [3; 32],
            Box::new(MemoryDirectory::new()),
            WallClock::new(now, UNIX_START_MS),
            now,
        );
        World {
            sn,
            now,
            mac_keys: MacKeys::new(&sn_keys.noise_public()),
            sn_public: sn_keys.noise_public(),
            authority,
            clients: HashMap::new(),
            by_addr: HashMap::new(),
            contacts: HashMap::new(),
        }
    }

    /// Client side of a login: keys, certificate, hello, Noise message 1.
    fn prepare(authority: &Authority, sn_public: &[u8; 32], keys: &MacKeys, i: usize) -> Prepared {
        let mut rng = ChaCha20Rng::seed_from_u64(i as u64 ^ 0x5eed_0000_0000);
        let mut kb = [0u8; 64];
        rng.fill_bytes(&mut kb);
        let dk = DeviceKeys::from_bytes(&kb);
        let req = CertRequest {
            username: username(i),
            device_id: [7; 16],
            noise_key: dk.noise_public(),
            sign_key: dk.sign_public(),
        };
        let cert = authority.issue(&req, i as u64 + 1, UNIX_START_MS / 1000, 24 * 3600);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            unix_ms: UNIX_START_MS,
            cert: Some(cert.to_bytes()),
            presence: Presence::Online,
            relay_only: false,
        }
        .encode()
        .unwrap();
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let (hs, msg1) = Handshake::initiate(&dk.noise_private(), sn_public, seed, &hello).unwrap();
        let init = cookie::encode_init(i as u32 + 1, &msg1, keys, None);
        Prepared { user: i, hs, init }
    }

    /// Runs `f` over `items` on every core, keeping the order.
    fn parallel<T: Send, U: Send>(items: Vec<T>, f: impl Fn(T) -> U + Sync) -> Vec<U> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = items.len().div_ceil(threads).max(1);
        let mut chunks: Vec<Vec<T>> = Vec::new();
        let mut it = items.into_iter().peekable();
        while it.peek().is_some() {
            chunks.push(it.by_ref().take(per).collect());
        }
        let f = &f;
        std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|c| s.spawn(move || c.into_iter().map(f).collect::<Vec<U>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        })
    }

    /// Logs `users` in, in chunks: client handshakes on every core, the supernode's side
    /// here; each session is confirmed with a keepalive, then the storage operations of
    /// the logins are answered and the pushes they cause are answered by the clients.
    fn log_in(&mut self, users: impl Iterator<Item = usize>) {
        let users: Vec<usize> = users.collect();
        let authority = Authority::from_bytes(&self.authority.to_bytes());
        let sn_public = self.sn_public;
        let keys = MacKeys::new(&sn_public);
        std::thread::scope(|scope| {
            // The next chunk's client handshakes are prepared while the supernode works
            // through this one.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            scope.spawn(move || {
                for chunk in users.chunks(5_000) {
                    let prepared = Self::parallel(chunk.to_vec(), |i| {
                        Self::prepare(&authority, &sn_public, &keys, i)
                    });
                    if tx.send(prepared).is_err() {
                        return;
                    }
                }
            });
            for prepared in rx {
                self.log_in_chunk(prepared);
            }
        });
        assert_eq!(
            self.sn.online_count(),
            self.clients.len(),
            "every user is in"
        );
    }

    fn log_in_chunk(&mut self, prepared: Vec<Prepared>) {
        let mut ops = Vec::new();
        let mut answers = Vec::with_capacity(prepared.len());
        for p in prepared {
            self.sn.handle_datagram(self.now, addr(p.user), &p.init);
            let msg2 = self.drain_handshake_response(p.user);
            ops.extend(std::iter::from_fn(|| self.sn.poll_op()));
            answers.push((p, msg2));
        }
        let finished = Self::parallel(answers, |(p, (sn_index, msg2))| {
            let (transport, _) = p.hs.finish(&msg2).unwrap();
            let mut c = Client {
                transport,
                sn_index,
                next_id: 0,
            };
            let keepalive = c.datagram(&Frame::Keepalive);
            (p.user, c, keepalive)
        });
        for (i, c, keepalive) in finished {
            self.sn.handle_datagram(self.now, addr(i), &keepalive);
            // The echo of the first keepalive: nothing to do with it.
            while self.sn.poll_transmit().is_some() {}
            self.clients.insert(i, c);
            self.by_addr.insert(addr(i), i);
        }
        for (token, op) in ops {
            let result = self.store_answer(op);
            self.sn.handle_op_result(self.now, token, result);
        }
        self.deliver([]);
    }

    fn drain_handshake_response(&mut self, user: usize) -> (u32, Vec<u8>) {
        let mut found = None;
        while let Some(t) = self.sn.poll_transmit() {
            if let Ok(Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            }) = Packet::decode(&t.payload)
            {
                assert_eq!(receiver as usize, user + 1);
                found = Some((sender, noise.to_vec()));
            }
        }
        found.expect("the supernode answered the handshake")
    }

    /// What the store would answer: devices unrevoked, contacts as configured, no mail.
    fn store_answer(&self, op: Op) -> OpResult {
        match op {
            Op::Login { user, .. } => {
                let i: usize = user.as_str()[4..].parse().unwrap();
                let names = self.contacts.get(&i).map_or_else(Vec::new, |c| {
                    c.iter().map(|&j| username(j)).collect::<Vec<_>>()
                });
                OpResult::Login(LoginLookups {
                    device: Ok(()),
                    contacts: Ok(names),
                    pending: Ok(Vec::new()),
                })
            }
            Op::Pending { .. } => OpResult::Messages(Ok(Vec::new())),
            other => panic!("unexpected storage operation {other:?}"),
        }
    }

    /// Delivers `sent` and the supernode's queued datagrams to the clients, which answer
    /// every push `Ok`, until nothing is left in flight.
    fn deliver(&mut self, sent: impl IntoIterator<Item = Transmit>) {
        let mut queue: VecDeque<Transmit> = sent.into_iter().collect();
        queue.extend(std::iter::from_fn(|| self.sn.poll_transmit()));
        while let Some(t) = queue.pop_front() {
            let Some(&i) = self.by_addr.get(&t.dst) else {
                continue;
            };
            let Ok(Packet::Transport {
                counter,
                ciphertext,
                ..
            }) = Packet::decode(&t.payload)
            else {
                continue;
            };
            let c = self.clients.get_mut(&i).unwrap();
            let plaintext = c.transport.open(counter, ciphertext).unwrap();
            if let Frame::Request { id, .. } = Frame::decode(&plaintext).unwrap() {
                let answer = c.datagram(&Frame::Response {
                    id,
                    body: Response::Ok,
                });
                self.sn.handle_datagram(self.now, t.dst, &answer);
                queue.extend(std::iter::from_fn(|| self.sn.poll_transmit()));
            }
        }
    }
}

/// A supernode with users `0..n` logged in (no contacts).
fn logged_in(n: usize) -> World {
    let t = Instant::now();
    let mut w = World::new();
    w.log_in(0..n);
    eprintln!(
        "session_lookup: {n} users logged in in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    w
}

/// A supernode where user 0 and its `k` contacts (users `1..=k`) are online.
fn with_contacts(k: usize) -> World {
    let mut w = World::new();
    w.contacts.insert(0, (1..=k).collect());
    for j in 1..=k {
        w.contacts.insert(j, vec![0]);
    }
    w.log_in(1..=k);
    w.log_in(0..1);
    w
}

// Worlds are built on the first call of a benchmark's routine, so a benchmark left out by
// a filter (`cargo bench -- presence`) costs no setup.

fn session_lookup(c: &mut Criterion) {
    let sizes: &[usize] = if full_size() {
        &[1_000, 100_000]
    } else {
        &[1_000]
    };
    let mut g = c.benchmark_group("session_lookup");
    for &n in sizes {
        let mut world: Option<(World, ChaCha20Rng)> = None;
        g.bench_with_input(BenchmarkId::new("keepalive", n), &n, |b, &n| {
            let (w, rng) =
                world.get_or_insert_with(|| (logged_in(n), ChaCha20Rng::seed_from_u64(n as u64)));
            let World {
                sn, clients, now, ..
            } = w;
            let now = *now;
            b.iter_batched(
                || {
                    let i = rng.next_u32() as usize % n;
                    let c = clients.get_mut(&i).unwrap();
                    (addr(i), c.datagram(&Frame::Keepalive))
                },
                |(from, d)| {
                    sn.handle_datagram(now, from, &d);
                    // The echo, as the driver would take it to send.
                    while let Some(t) = sn.poll_transmit() {
                        black_box(t);
                    }
                },
                BatchSize::SmallInput,
            )
        });
        if let Some((w, _)) = &world {
            assert_eq!(w.sn.stats().drops_for(DropReason::BadTransport), 0);
            assert_eq!(w.sn.online_count(), n, "every session lived through");
        }
    }
    g.finish();
}

fn presence_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence_fanout");
    for k in [10usize, 100, 1_000] {
        let mut world: Option<World> = None;
        g.throughput(Throughput::Elements(k as u64));
        g.bench_with_input(BenchmarkId::new("contacts", k), &k, |b, &k| {
            let w = world.get_or_insert_with(|| with_contacts(k));
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                let mut out = Vec::with_capacity(k + 1);
                for it in 0..iters {
                    let p = if it % 2 == 0 {
                        Presence::Away
                    } else {
                        Presence::Online
                    };
                    let d = w
                        .clients
                        .get_mut(&0)
                        .unwrap()
                        .request(Request::SetPresence(p));
                    let t = Instant::now();
                    w.sn.handle_datagram(w.now, addr(0), &d);
                    out.extend(std::iter::from_fn(|| w.sn.poll_transmit()));
                    spent += t.elapsed();
                    // Not timed: the answer and the k pushes reach the clients, and the
                    // contacts answer theirs, so the next change finds the same state.
                    assert_eq!(out.len(), k + 1, "the answer and the k pushes");
                    w.deliver(out.drain(..));
                }
                spent
            })
        });
        if let Some(w) = &world {
            assert_eq!(w.sn.online_count(), k + 1);
            assert_eq!(w.sn.stats().drops_for(DropReason::BadTransport), 0);
        }
    }
    g.finish();
}

fn login(c: &mut Criterion) {
    let mut g = c.benchmark_group("login");
    let mut world: Option<World> = None;
    let mut next = 0usize;
    g.bench_function("certificate", |b| {
        let w = world.get_or_insert_with(World::new);
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let p = World::prepare(&w.authority, &w.sn_public, &w.mac_keys, next);
                next += 1;
                let t = Instant::now();
                w.sn.handle_datagram(w.now, addr(p.user), &p.init);
                let ops: Vec<_> = std::iter::from_fn(|| w.sn.poll_op()).collect();
                for (token, op) in ops {
                    let result = w.store_answer(op);
                    w.sn.handle_op_result(w.now, token, result);
                }
                let msg2 = w.drain_handshake_response(p.user);
                spent += t.elapsed();
                // Not timed: the client completes the handshake and confirms the session,
                // so half-open sessions do not pile up to their cap.
                let (transport, _) = p.hs.finish(&msg2.1).unwrap();
                let mut c = Client {
                    transport,
                    sn_index: msg2.0,
                    next_id: 0,
                };
                w.sn.handle_datagram(w.now, addr(p.user), &c.datagram(&Frame::Keepalive));
                while w.sn.poll_transmit().is_some() {}
            }
            spent
        })
    });
    g.finish();
    if let Some(w) = &world {
        assert_eq!(w.sn.online_count(), next, "every login succeeded");
    }
}

fn stun_binding(c: &mut Criterion) {
    let mut g = c.benchmark_group("stun_binding");
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(&[5; 12]);
    let from = addr(77);
    let mut out = [0u8; peerline_core::stun::ANSWER_MAX];
    g.bench_function("answer_into", |b| {
        b.iter(|| peerline_core::stun::answer_into(black_box(&req), from, &mut out).unwrap())
    });
    let mut world: Option<World> = None;
    g.bench_function("supernode_handle_datagram_into", |b| {
        let w = world.get_or_insert_with(World::new);
        b.iter(|| {
            w.sn.handle_datagram_into(w.now, from, black_box(&req), &mut out)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short by default; the command line (`-- --measurement-time N`) overrides.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = session_lookup, presence_fanout, login, stun_binding
}
criterion_main!(benches);
