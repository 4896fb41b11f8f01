//! Floods against a running `peerlined` (a real process on loopback).
//!
//! * `garbage_flood_*`: random, truncated, bit-flipped and replayed datagrams built from
//!   traffic captured from real clients; afterwards the daemon is up, its resident memory
//!   is back within 10 % of its baseline, and a client logs in and messages within 1 s.
//! * `spoofed_handshake_flood_*`: handshake initiations from many loopback source
//!   addresses that never answer, as fast as one thread sends them, while legitimate
//!   clients log in; their success rate and login latency are printed.
//!
//! The CI variants are small; the full runs are `#[ignore]`d (run them with
//! `cargo test -p peerlined --test flood -- --ignored --nocapture`, and with
//! `PEERLINED_BIN=target/release/peerlined` to flood a release build).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use peerline_core::client::{Client, ClientConfig, ClientEvent, Command, CommandResult};
use peerline_core::clock::WallClock;
use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::DeviceKeys;
use peerline_net::bootstrap::Bootstrap;
use peerline_wire::msg::ContactAction;
use peerline_wire::Username;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

fn free_port() -> u16 {
    peerline_net::ports::free_loopback_port().expect("a free loopback port")
}

/// The daemon under test: this build's, or the one `PEERLINED_BIN` names (for example a
/// release build, to measure what the daemon rather than a debug build can take).
fn peerlined_bin() -> PathBuf {
    std::env::var_os("PEERLINED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_peerlined")))
}

/// A `peerlined` process with its own data dir.
struct Daemon {
    _dir: tempfile::TempDir,
    data: PathBuf,
    child: Child,
    admin: SocketAddr,
    boot: Bootstrap,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("sn");
        let port = free_port();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let out = Proc::new(peerlined_bin())
            .args(["init", "--data"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &admin.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // No relay: the tests may run in parallel, and the relay's port is fixed.
        let cfg = data.join("peerlined.toml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("relay_listen") {
                    "relay_listen = \"off\"".to_string()
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(&cfg, text).unwrap();
        let log = std::fs::File::create(data.join("test.log")).unwrap();
        let child = Proc::new(peerlined_bin())
            .args(["run", "--data"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let boot = Bootstrap::parse(
            std::fs::read_to_string(data.join("bootstrap"))
                .unwrap()
                .trim(),
        )
        .unwrap();
        let d = Daemon {
            _dir: dir,
            data,
            child,
            admin,
            boot,
        };
        let t0 = Instant::now();
        while d.try_metrics().is_none() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "peerlined did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn addr(&self) -> SocketAddr {
        self.boot.addr().unwrap()
    }

    fn try_metrics(&self) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.contains("peerline_datagrams_in_total").then_some(out)
    }

    /// One metric (the admin endpoint refreshes them every second).
    fn metric(&self, name: &str) -> u64 {
        let m = self.try_metrics().expect("metrics");
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits until the daemon has read everything sent to it (its input counter stops).
    fn settle(&self) {
        let mut last = self.metric("peerline_datagrams_in_total");
        loop {
            std::thread::sleep(Duration::from_millis(1100));
            let now = self.metric("peerline_datagrams_in_total");
            if now == last {
                return;
            }
            last = now;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.data.join("test.log")) {
                eprintln!("--- peerlined log ---\n{log}");
            }
        }
    }
}

/// A client core on a blocking UDP socket, driven by hand.
struct Peer {
    socket: UdpSocket,
    client: Client,
    events: Vec<ClientEvent>,
    /// Datagrams this client sent to the supernode (for replays).
    captured: Vec<Vec<u8>>,
    server: SocketAddr,
}

impl Peer {
    fn new(d: &Daemon, ip: Ipv4Addr, keys: DeviceKeys, cert: Option<&[u8]>) -> Peer {
        let socket = UdpSocket::bind(SocketAddr::new(IpAddr::V4(ip), 0)).unwrap();
        socket.set_nonblocking(true).unwrap();
        let cfg = ClientConfig::new(d.addr(), d.boot.node_key, d.boot.authority);
        let now = Instant::now();
        let mut seed = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut seed);
        let mut client = Client::new(
            cfg,
            keys,
            cert,
            seed,
            WallClock::new(now, peerline_net::unix_ms_now()),
            now,
        );
        client.set_local_candidates(vec![socket.local_addr().unwrap()]);
        client.connect(now);
        Peer {
            socket,
            client,
            events: Vec::new(),
            captured: Vec::new(),
            server: d.addr(),
        }
    }

    fn step(&mut self) {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = self.socket.recv_from(&mut buf) {
            self.client.handle_datagram(Instant::now(), from, &buf[..n]);
        }
        let now = Instant::now();
        if self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle_timeout(now);
        }
        while let Some(t) = self.client.poll_transmit() {
            if t.dst == self.server {
                self.captured.push(t.payload.clone());
            }
            let _ = self.socket.send_to(&t.payload, t.dst);
        }
        while let Some(e) = self.client.poll_event() {
            if let ClientEvent::Message { token, .. } = &e {
                self.client.message_saved(Instant::now(), *token);
            }
            self.events.push(e);
        }
    }
}

/// Steps every peer until `done` holds; false after `limit`.
fn run_until(
    peers: &mut [&mut Peer],
    limit: Duration,
    mut done: impl FnMut(&[&mut Peer]) -> bool,
) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        for p in peers.iter_mut() {
            p.step();
        }
        if done(peers) {
            return true;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    false
}

fn command(p: &mut Peer, others: &mut [&mut Peer], cmd: Command) -> CommandResult {
    let id = p.client.command(Instant::now(), cmd);
    let end = Instant::now() + Duration::from_secs(20);
    while Instant::now() < end {
        p.step();
        for o in others.iter_mut() {
            o.step();
        }
        if let Some(r) = p.events.iter().find_map(|e| match e {
            ClientEvent::CommandDone { id: d, result } if *d == id => Some(result.clone()),
            _ => None,
        }) {
            return r;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    panic!("command {id} did not finish");
}

fn user(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn keys() -> DeviceKeys {
    DeviceKeys::generate(&mut rand_core::OsRng)
}

fn register(d: &Daemon, ip: Ipv4Addr, name: &str) -> (DeviceKeys, Vec<u8>, Peer) {
    let k = keys();
    let mut p = Peer::new(d, ip, k.clone(), None);
    let r = command(
        &mut p,
        &mut [],
        Command::Register {
            username: user(name),
            password: "correct horse battery".into(),
        },
    );
    assert_eq!(r, CommandResult::Ok, "register {name}");
    let cert = p.client.certificate().unwrap().to_bytes();
    (k, cert, p)
}

/// Alice and Bob, registered, mutual contacts, with one message exchanged; returns the
/// datagrams their clients sent to the supernode.
fn two_users(d: &Daemon) -> (Vec<Vec<u8>>, (DeviceKeys, Vec<u8>), Peer) {
    let (ak, acert, mut a) = register(d, Ipv4Addr::new(127, 0, 0, 1), "alice");
    let (_, _, mut b) = register(d, Ipv4Addr::new(127, 0, 0, 2), "bob");
    let r = command(
        &mut a,
        &mut [&mut b],
        Command::ContactAdd {
            user: user("bob"),
            note: "hi".into(),
        },
    );
    assert_eq!(r, CommandResult::Ok);
    let r = command(
        &mut b,
        &mut [&mut a],
        Command::ContactReply {
            user: user("alice"),
            action: ContactAction::Accept,
        },
    );
    assert_eq!(r, CommandResult::Ok);
    for i in 0..3 {
        let r = command(
            &mut a,
            &mut [&mut b],
            Command::SendMessage {
                to: user("bob"),
                text: format!("before the flood {i}"),
            },
        );
        assert!(matches!(r, CommandResult::Sent { .. }), "{r:?}");
    }
    let _ = command(
        &mut b,
        &mut [&mut a],
        Command::Search {
            prefix: "al".into(),
        },
    );
    let _ = command(&mut a, &mut [&mut b], Command::ContactList);
    let mut captured = std::mem::take(&mut a.captured);
    captured.append(&mut b.captured);
    a.client.shutdown(Instant::now());
    a.step();
    (captured, (ak, acert), b)
}

/// A fresh client of an existing account logs in and messages Bob: the time it took.
fn login_and_message(
    d: &Daemon,
    who: &(DeviceKeys, Vec<u8>),
    bob: &mut Peer,
    text: &str,
) -> Duration {
    let t0 = Instant::now();
    let mut a = Peer::new(d, Ipv4Addr::new(127, 0, 0, 1), who.0.clone(), Some(&who.1));
    assert!(
        run_until(&mut [&mut a, bob], Duration::from_secs(10), |p| p[0]
            .client
            .is_online()),
        "alice did not log in: {:?}",
        a.events
    );
    let r = command(
        &mut a,
        &mut [bob],
        Command::SendMessage {
            to: user("bob"),
            text: text.into(),
        },
    );
    assert!(matches!(r, CommandResult::Sent { .. }), "{r:?}");
    let took = t0.elapsed();
    a.client.shutdown(Instant::now());
    a.step();
    took
}

/// One hostile datagram: random, a truncated, bit-flipped or replayed capture.
fn hostile(rng: &mut ChaCha20Rng, captured: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    let pick = &captured[rng.next_u32() as usize % captured.len()];
    match rng.next_u32() % 4 {
        0 => {
            let n = rng.next_u32() as usize % 1300;
            out.resize(n, 0);
            rng.fill_bytes(out);
        }
        1 => {
            let cut = rng.next_u32() as usize % pick.len().max(1);
            out.extend_from_slice(&pick[..cut]);
        }
        2 => {
            out.extend_from_slice(pick);
            for _ in 0..1 + rng.next_u32() % 3 {
                let bit = rng.next_u32() as usize % (out.len() * 8);
                out[bit / 8] ^= 1 << (bit % 8);
            }
        }
        _ => out.extend_from_slice(pick),
    }
}

/// Datagrams per second of the garbage flood.
const FLOOD_RATE: u64 = 10_000;

fn garbage_flood(count: u64) {
    let mut d = Daemon::start();
    let (captured, alice, mut bob) = two_users(&d);
    assert!(captured.len() >= 10, "captured {}", captured.len());
    d.settle();
    let baseline = d.rss_kib();
    let received_before = d.metric("peerline_datagrams_in_total");
    let mut rng = ChaCha20Rng::seed_from_u64(2026);
    let socket = UdpSocket::bind("127.0.0.3:0").unwrap();
    let target = d.addr();
    let mut buf = Vec::with_capacity(1300);
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut next_check = 20_000;
    while sent < count {
        for _ in 0..20 {
            hostile(&mut rng, &captured, &mut buf);
            if socket.send_to(&buf, target).is_ok() {
                sent += 1;
            }
        }
        // Small bursts at a steady rate: the socket buffer holds only a few hundred
        // datagrams, and a debug build on a busy box reads some ten thousand a second.
        let due = t0 + Duration::from_secs_f64(sent as f64 / FLOOD_RATE as f64);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        // Keep Bob's session alive meanwhile.
        if sent % 1000 < 20 {
            bob.step();
        }
        // Pace to what the daemon reads, so the datagrams reach it rather than overflow
        // the socket buffer (the kernel would drop them before peerlined saw them).
        // (The kernel may still drop some when the box is busy: stop waiting once the
        // daemon's counter stops moving.)
        if sent >= next_check {
            next_check = sent + 20_000;
            let mut last = u64::MAX;
            loop {
                let seen = d.metric("peerline_datagrams_in_total") - received_before;
                if sent.saturating_sub(seen) < 60_000 || seen == last {
                    break;
                }
                last = seen;
                for _ in 0..20 {
                    bob.step();
                    std::thread::sleep(Duration::from_millis(60));
                }
            }
        }
    }
    let send_time = t0.elapsed();
    d.settle();
    let received = d.metric("peerline_datagrams_in_total") - received_before;
    let after = d.rss_kib();
    assert!(d.alive(), "peerlined died");
    let took = login_and_message(&d, &alice, &mut bob, "after the flood");
    let panics = d.metric("peerline_panics_caught_total");
    println!(
        "garbage flood: sent {sent} in {:.1} s ({:.0}/s), peerlined received {received}; \
         RSS baseline {baseline} KiB, after {after} KiB ({:+.1} %); panics caught {panics}; \
         login + message after: {} ms",
        send_time.as_secs_f64(),
        sent as f64 / send_time.as_secs_f64(),
        (after as f64 - baseline as f64) * 100.0 / baseline as f64,
        took.as_millis()
    );
    println!(
        "{}",
        d.try_metrics()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("peerline_dropped_by_reason")
                || l.starts_with("peerline_cookies"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // On a busy box (tests run in parallel) the kernel drops part of the flood before
    // peerlined reads it; what matters is that most of it was handled.
    assert!(received * 2 >= sent, "most datagrams reached peerlined");
    assert!(
        after as f64 <= baseline as f64 * 1.10,
        "RSS {after} KiB is more than 10 % over the baseline {baseline} KiB"
    );
    assert_eq!(panics, 0);
    assert!(
        took < Duration::from_secs(1),
        "login and message took {took:?}"
    );
}

#[test]
fn garbage_flood_small() {
    garbage_flood(100_000);
}

#[test]
#[ignore = "a million datagrams at 10,000/s: about two minutes; run with --ignored"]
fn garbage_flood_million() {
    garbage_flood(1_000_000);
}

/// A handshake initiation with a valid mac1 and random Noise bytes: what a flooder who
/// knows the supernode's public key (everyone does) can make at no cost.
fn spoofed_init(rng: &mut ChaCha20Rng, keys: &MacKeys) -> Vec<u8> {
    let mut noise = [0u8; 113];
    rng.fill_bytes(&mut noise);
    cookie::encode_init(rng.next_u32() | 1, &noise, keys, None)
}

/// `rate`: initiations per second, or as fast as one thread sends (`None`).
fn spoofed_handshake_flood(seconds: u64, logins: usize, rate: Option<u64>) {
    let d = Daemon::start();
    // Accounts registered from their own addresses (registrations are limited per source).
    let accounts: Vec<(DeviceKeys, Vec<u8>)> = (0..logins.div_ceil(4))
        .map(|i| {
            let (k, c, mut p) = register(
                &d,
                Ipv4Addr::new(127, 0, 1, 1 + i as u8),
                &format!("user{i}"),
            );
            p.client.shutdown(Instant::now());
            p.step();
            (k, c)
        })
        .collect();
    let target = d.addr();
    let keys = MacKeys::new(&d.boot.node_key);
    let rss_before = d.rss_kib();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // 1,024 source addresses in 127.2.0.0/16 that never read their answers.
            let sockets: Vec<UdpSocket> = (0..1024u32)
                .filter_map(|i| {
                    UdpSocket::bind(SocketAddr::new(
                        Ipv4Addr::new(127, 2, (i >> 8) as u8, (i & 0xff) as u8).into(),
                        0,
                    ))
                    .ok()
                })
                .collect();
            let mut rng = ChaCha20Rng::seed_from_u64(7);
            let inits: Vec<Vec<u8>> = (0..4096).map(|_| spoofed_init(&mut rng, &keys)).collect();
            let t0 = Instant::now();
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(r) = rate {
                    let due = (t0.elapsed().as_secs_f64() * r as f64) as u64;
                    if sent > due {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                }
                for _ in 0..256 {
                    let s = &sockets[sent as usize % sockets.len()];
                    if s.send_to(&inits[sent as usize % inits.len()], target)
                        .is_ok()
                    {
                        sent += 1;
                    }
                }
            }
            (sent, t0.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let mut ok = 0usize;
    let mut latencies = Vec::new();
    let t0 = Instant::now();
    let spacing =
        Duration::from_secs(seconds).saturating_sub(Duration::from_secs(1)) / logins as u32;
    for i in 0..logins {
        let who = &accounts[i % accounts.len()];
        let ip = Ipv4Addr::new(127, 0, 1, 1 + (i % accounts.len()) as u8);
        let start = Instant::now();
        let mut p = Peer::new(&d, ip, who.0.clone(), Some(&who.1));
        if run_until(&mut [&mut p], Duration::from_secs(10), |p| {
            p[0].client.is_online()
        }) {
            ok += 1;
            latencies.push(start.elapsed());
        }
        p.client.shutdown(Instant::now());
        p.step();
        let next = t0 + spacing * (i as u32 + 1);
        if let Some(w) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, took) = flood.join().unwrap();
    let rss_flood = d.rss_kib();
    d.settle();
    // Half-open sessions expire after 10 s.
    std::thread::sleep(Duration::from_secs(11));
    latencies.sort();
    let pct = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0, |d| d.as_millis())
    };
    let received = d.metric("peerline_datagrams_in_total");
    let cookies = d.metric("peerline_cookies_sent_total");
    let rss = d.rss_kib();
    println!(
        "RSS before {rss_before} KiB, at the end of the flood {rss_flood} KiB, after {rss} KiB"
    );
    let rejected = d.metric("peerline_dropped_by_reason_total{reason=\"cookie_required\"}");
    println!(
        "spoofed handshake flood: {sent} initiations in {:.1} s ({:.0}/s) from 1,024 addresses; \
         peerlined received {received} datagrams, answered {rejected} initiations without \
         Diffie-Hellman work ({cookies} with a cookie reply), RSS {rss} KiB; \
         legitimate logins {ok}/{logins} succeeded, latency p50 {} ms, p95 {} ms, max {} ms",
        took.as_secs_f64(),
        sent as f64 / took.as_secs_f64(),
        pct(0.5),
        pct(0.95),
        pct(1.0)
    );
    if rate.is_some() {
        assert_eq!(ok, logins, "every legitimate login succeeded");
    } else {
        // At full speed the kernel drops most datagrams before peerlined reads them,
        // the legitimate ones alike: report, and require that logins still get through.
        assert!(ok > 0, "no legitimate login succeeded");
    }
    assert!(cookies > 0, "the flood put the supernode under load");
    assert!(d.metric("peerline_half_open_sessions") <= 2_000);
}

#[test]
fn spoofed_handshake_flood_small() {
    // Above the load threshold (2,000/s), at a rate a loaded CI box keeps up with.
    spoofed_handshake_flood(4, 8, Some(5_000));
}

#[test]
#[ignore = "a 30 s flood; run with --ignored"]
fn spoofed_handshake_flood_full() {
    spoofed_handshake_flood(30, 60, None);
}
