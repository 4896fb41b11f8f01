//! Simulated clients in bulk.
//!
//! Clients are split into shards; a shard is one UDP socket on its own loopback address
//! (so a per-source limit on the supernode sees many sources) and a vector of compact
//! client records, run as one tokio task. A client record holds its session keys (boxed
//! [`Transport`] from the crypto crate), its handshake while one is in flight, and a few
//! 32-bit timestamps: no per-client task, timer or channel. Timers are a timing wheel of
//! 5 ms slots per shard; each client has at most one live wheel entry.
//!
//! What a client sends is what `crates/core/src/client.rs` sends, built with the wire and
//! crypto crates' public functions: a Noise IK handshake whose `Hello` carries its
//! certificate, keepalives (echoed by the supernode), and requests (`SetPresence`,
//! `Search`, `Connect`) retransmitted with the same id at 0.4, 1.2, 2.8, 5.8 and 8.8 s.
//! It answers the supernode's pushes (`PresenceEvent` with `Ok`, `IncomingConnect` with
//! `ConnectAnswer`). A handshake unanswered after 1 s is retried after a jittered
//! exponential backoff (protocol section 7.10); one refused with `Busy` is retried after
//! the supernode's retry-after plus 0 to 50 % jitter, without counting as a failure; a
//! client never gives up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use peerline_crypto::cookie::{self, MacKeys, COOKIE_LEN, COOKIE_USE_S};
use peerline_crypto::{Handshake, Transport};
use peerline_wire::msg::{Frame, Hello, Presence, Request, Response, Welcome};
use peerline_wire::packet::{Packet, RejectReason};
use peerline_wire::PROTOCOL_VERSION;
use rand::{Rng, SeedableRng};

use crate::users::{partner, username, Users};

/// Phases the driver moves all shards through.
pub mod phase {
    /// Log clients in, at most `inflight` handshakes at once.
    pub const LOGIN: u8 = 0;
    /// Keepalives only.
    pub const HOLD: u8 = 1;
    /// Keepalives and the request mix.
    pub const MIX: u8 = 2;
    /// Every client drops its session and logs in again at once (then keepalives).
    pub const STORM: u8 = 3;
    /// Stop.
    pub const STOP: u8 = 4;
    /// Keepalives, while every client computes the initiation of its next login ahead of
    /// the storm (a real client does that on its own machine, not on the supernode's).
    pub const PREPARE: u8 = 5;
}

/// Operations whose latency is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A successful handshake (send to response).
    Login = 0,
    /// Keepalive to its echo.
    Keepalive = 1,
    /// `SetPresence`.
    Presence = 2,
    /// `Search` for the contact's name.
    Lookup = 3,
    /// `Connect` to the contact (rendezvous through the supernode).
    Connect = 4,
}

/// Number of [`Op`]s.
pub const OPS: usize = 5;
/// Names of the [`Op`]s, in order.
pub const OP_NAMES: [&str; OPS] = ["login", "keepalive", "presence", "lookup", "connect"];

const TICK_MS: u32 = 5;
const WHEEL: usize = 8192;
const NONE: u32 = u32::MAX;
const HANDSHAKE_TIMEOUT_MS: u32 = 1000;
const IDLE_EXPIRY_MS: u32 = 80_000;
const REQUEST_TRANSMISSIONS: u8 = 6;
/// Most wheel entries handled per loop turn, and handshakes started, so a shard keeps
/// reading its socket during a storm.
const WORK_BUDGET: usize = 4096;
const HANDSHAKE_BUDGET: usize = 24;
/// Initiations prepared per shard per tick ahead of a storm (keepalives go on meanwhile).
const PREPARE_BUDGET: usize = 48;

const IDLE: u8 = 0;
const HANDSHAKING: u8 = 1;
const BACKOFF: u8 = 2;
const ONLINE: u8 = 3;

const F_KA: u8 = 1; // keepalive outstanding
const F_AWAY: u8 = 2; // last presence sent was Away
const F_EVER: u8 = 4; // has been online once
const F_ANSWERED: u8 = 8; // got at least one answer (echo or response)

/// A handshake in flight and the initiation that started it: a `Busy` answer means the
/// supernode did not process it, so after the wait the same datagram goes out again
/// (no new key exchange to compute: in a storm most clients are told `Busy` a few times).
///
/// After a timeout it goes out again unchanged too, up to [`TIMEOUT_RESENDS`] times: in a
/// storm the kernel drops initiations from the supernode's full socket buffer, and the
/// supernode never saw them. If it did process one and its answer was lost, the supernode
/// drops the exact repeat as a duplicate and the client times out again, then computes a
/// new one. A real client computes a new one at once, on its own CPU; here that CPU is the
/// supernode's.
struct InFlight {
    hs: Handshake,
    init: Vec<u8>,
    created_ms: u32,
    /// Times sent again after a timeout.
    timeouts: u8,
}

/// Times an initiation is sent again unchanged after a timeout.
const TIMEOUT_RESENDS: u8 = 2;

/// A kept initiation is sent again only while its hello is this fresh (the supernode
/// refuses hellos more than 300 s off its clock).
const INIT_REUSE_MS: u32 = 240_000;

/// One simulated client: about 72 bytes plus its session keys.
#[derive(Default)]
struct Client {
    transport: Option<Box<Transport>>,
    hs: Option<Box<InFlight>>,
    /// The next login's initiation, computed ahead of a storm.
    prepared: Option<Box<InFlight>>,
    remote: u32,
    sched: u32,
    sent_us: u32,
    ka_us: u32,
    next_ka: u32,
    last_rx: u32,
    req_retx: u32,
    req_id: u32,
    next_id: u32,
    hs_deadline: u32,
    state: u8,
    attempt: u8,
    req_kind: u8,
    req_tries: u8,
    flags: u8,
}

/// What the engine needs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The supernode's address.
    pub target: SocketAddr,
    /// Its Noise static key.
    pub node_key: [u8; 32],
    /// Sockets (shards).
    pub shards: usize,
    /// Handshakes in flight at most during the login phase (over all shards).
    pub inflight: usize,
    /// Keepalive interval.
    pub keepalive: Duration,
    /// `SetPresence` requests per second (all clients together).
    pub presence_rate: f64,
    /// `Search` requests per second.
    pub lookup_rate: f64,
    /// `Connect` requests per second.
    pub connect_rate: f64,
    /// Seed for the clients' randomness.
    pub seed: u64,
}

/// Live counters, shared by all shards and read by the driver.
#[derive(Default)]
pub struct Counters {
    /// Successful logins.
    pub logins: AtomicU64,
    /// Clients online now.
    pub online: AtomicI64,
    /// Handshakes sent.
    pub handshakes: AtomicU64,
    /// Handshakes given up after 1 s.
    pub handshake_timeouts: AtomicU64,
    /// Keepalives sent.
    pub keepalives: AtomicU64,
    /// Keepalive echoes received.
    pub echoes: AtomicU64,
    /// Requests sent (first transmissions).
    pub requests: AtomicU64,
    /// Retransmissions.
    pub retransmissions: AtomicU64,
    /// Responses received with a success body.
    pub answered_ok: AtomicU64,
    /// Responses received with an error body.
    pub answered_err: AtomicU64,
    /// Requests that ran out of transmissions.
    pub failed: AtomicU64,
    /// Supernode pushes answered.
    pub pushes: AtomicU64,
    /// Resets acted on.
    pub resets: AtomicU64,
    /// Sessions closed by the supernode.
    pub closes: AtomicU64,
    /// Sessions lost to idle expiry.
    pub expired: AtomicU64,
    /// Mix requests skipped because the picked clients were busy or offline.
    pub skipped: AtomicU64,
    /// Highest handshake attempt number seen.
    pub max_attempt: AtomicU64,
    /// Datagrams that matched no client or failed authentication.
    pub stray: AtomicU64,
    /// Cookie replies taken (the supernode was under load and asked for proof of address).
    pub cookies: AtomicU64,
    /// `Busy` rejects taken: the supernode shed the handshake and said when to retry.
    pub busy: AtomicU64,
    /// Initiations sent again unchanged after a `Busy` or a timeout (no new key exchange).
    pub resent: AtomicU64,
    /// Initiations computed ahead of a storm.
    pub prepared: AtomicU64,
    /// Other rejects of a handshake in flight (retried after the normal backoff).
    pub rejected: AtomicU64,
    /// Shards that have acted on the current phase.
    pub acks: AtomicUsize,
}

/// State shared by the driver and the shards.
pub struct Shared {
    /// Current phase.
    pub phase: AtomicU8,
    /// Counters.
    pub counters: Counters,
    /// Latency of keepalives and requests per second of the run (2 significant digits).
    pub timeline: Mutex<BTreeMap<u32, Histogram<u64>>>,
    /// The run's time origin.
    pub start: Instant,
}

fn small_hist() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid")
}

/// Per-phase, per-op latency histograms of one shard (microseconds).
pub type PhaseHists = Vec<Vec<Histogram<u64>>>;

fn phase_hists() -> PhaseHists {
    (0..4)
        .map(|_| (0..OPS).map(|_| small_hist()).collect())
        .collect()
}

/// What a shard hands back when it stops.
pub struct ShardResult {
    /// Latencies by phase and op.
    pub hists: PhaseHists,
    /// Clients that logged in at least once.
    pub ever_online: usize,
    /// Clients that got at least one answer.
    pub answered: usize,
    /// Clients held.
    pub clients: usize,
}

struct Shard {
    no: usize,
    shards: usize,
    cfg: Arc<EngineConfig>,
    users: Arc<Users>,
    shared: Arc<Shared>,
    local: SocketAddr,
    clients: Vec<Client>,
    by_remote: HashMap<u32, u32>,
    wheel: Vec<Vec<u32>>,
    wheel_cur: u32,
    backlog: VecDeque<u32>,
    out: Vec<Vec<u8>>,
    rng: rand_chacha::ChaCha8Rng,
    cursor: usize,
    /// Next client to prepare an initiation for, ahead of a storm.
    prep_cursor: usize,
    inflight: usize,
    window: usize,
    tokens: [f64; 3],
    last_tick_us: u64,
    last_hello_ms: u64,
    seen_phase: u8,
    hists: PhaseHists,
    sec: u32,
    sec_hist: Histogram<u64>,
    hs_started: usize,
    /// mac1 keys for initiations to the supernode (from its static key).
    macs: MacKeys,
    /// The supernode's cookie for this socket's address (it asks for one under load), and
    /// when it came (ms).
    cookie: Option<([u8; COOKIE_LEN], u32)>,
    /// mac1 of each client's handshake in flight, to open a cookie reply to it.
    sent_mac1: HashMap<u32, [u8; 16]>,
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Shard {
    fn now_us(&self) -> u64 {
        self.shared.start.elapsed().as_micros() as u64
    }

    fn user(&self, slot: usize) -> usize {
        slot * self.shards + self.no
    }

    fn phase_index(&self) -> usize {
        (self.seen_phase as usize).min(3)
    }

    fn record(&mut self, op: Op, us: u64) {
        // While clients prepare a storm's initiations the generator takes both cores: the
        // latencies it would measure are its own.
        if self.seen_phase == phase::PREPARE {
            return;
        }
        let us = us.max(1);
        let p = self.phase_index();
        let _ = self.hists[p][op as usize].record(us);
        if op != Op::Login {
            let sec = (self.now_us() / 1_000_000) as u32;
            if sec != self.sec {
                self.flush_second();
                self.sec = sec;
            }
            let _ = self.sec_hist.record(us);
        }
    }

    fn flush_second(&mut self) {
        if self.sec_hist.is_empty() {
            return;
        }
        if let Ok(mut t) = self.shared.timeline.lock() {
            let e = t.entry(self.sec).or_insert_with(small_hist);
            let _ = e.add(&self.sec_hist);
        }
        self.sec_hist.reset();
    }

    /// Schedules a look at `slot` at `at_ms` (keeps only the earliest live entry).
    fn arm(&mut self, slot: u32, at_ms: u32) {
        let mut tick = at_ms / TICK_MS;
        tick = tick
            .max(self.wheel_cur)
            .min(self.wheel_cur + WHEEL as u32 - 1);
        let c = &mut self.clients[slot as usize];
        if c.sched != NONE && c.sched <= tick {
            return;
        }
        c.sched = tick;
        self.wheel[tick as usize % WHEEL].push(slot);
    }

    fn deadline(c: &Client) -> u32 {
        match c.state {
            HANDSHAKING | BACKOFF => c.hs_deadline,
            ONLINE => {
                if c.req_id != 0 {
                    c.next_ka.min(c.req_retx)
                } else {
                    c.next_ka
                }
            }
            _ => NONE,
        }
    }

    /// Moves due wheel entries to the backlog.
    fn drain_wheel(&mut self, now_ms: u32) {
        let until = now_ms / TICK_MS;
        while self.wheel_cur <= until {
            let b = self.wheel_cur as usize % WHEEL;
            let entries = std::mem::take(&mut self.wheel[b]);
            for slot in &entries {
                let c = &mut self.clients[*slot as usize];
                if c.sched == self.wheel_cur {
                    c.sched = NONE;
                    self.backlog.push_back(*slot);
                }
            }
            // Give the bucket's allocation back for reuse.
            let mut entries = entries;
            entries.clear();
            if self.wheel[b].is_empty() {
                self.wheel[b] = entries;
            }
            self.wheel_cur += 1;
        }
    }

    fn send(&mut self, b: Vec<u8>) {
        self.out.push(b);
    }

    fn send_frame(&mut self, slot: usize, frame: &Frame) {
        let c = &mut self.clients[slot];
        let Some(t) = c.transport.as_mut() else {
            return;
        };
        let Ok(pt) = frame.encode() else { return };
        let mut out = Vec::with_capacity(16 + pt.len() + 16);
        out.extend_from_slice(&[0u8; 16]);
        let Ok(counter) = t.seal(&pt, &mut out) else {
            return;
        };
        out[..16].copy_from_slice(&Packet::transport_header(c.remote, counter));
        self.send(out);
    }

    fn backoff_ms(&mut self, attempt: u8) -> u32 {
        // Protocol 7.10: 250 ms x 2^attempt, capped at 8 s, times U[0.5, 1].
        let base = (250u64 << attempt.min(8)).min(8000) as f64;
        (base * self.rng.gen_range(0.5..=1.0)) as u32
    }

    fn start_handshake(&mut self, slot: usize, now_ms: u32) {
        let ready = self.clients[slot]
            .prepared
            .take()
            .filter(|p| now_ms.saturating_sub(p.created_ms) <= INIT_REUSE_MS);
        let Some(f) = ready.or_else(|| self.initiation(slot, now_ms)) else {
            return;
        };
        self.sent_mac1
            .insert(slot as u32 + 1, cookie::mac1_of(&f.init));
        self.send(f.init.clone());
        self.clients[slot].hs = Some(f);
        self.handshake_sent(slot, now_ms);
    }

    /// A new initiation for the client in `slot` (its key exchange computed now).
    fn initiation(&mut self, slot: usize, now_ms: u32) -> Option<Box<InFlight>> {
        let uid = self.user(slot);
        self.last_hello_ms = wall_ms().max(self.last_hello_ms + 1);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            unix_ms: self.last_hello_ms,
            cert: Some(self.users.cert(uid).to_vec()),
            presence: Presence::Online,
            relay_only: false,
        };
        let payload = hello.encode().ok()?;
        let mut seed = [0u8; 32];
        self.rng.fill(&mut seed);
        let (hs, msg1) = Handshake::initiate(
            &self.users.noise_private(uid),
            &self.cfg.node_key,
            seed,
            &payload,
        )
        .ok()?;
        let fresh = self
            .cookie
            .filter(|(_, at)| now_ms.saturating_sub(*at) < COOKIE_USE_S as u32 * 1000)
            .map(|(c, _)| c);
        let init = cookie::encode_init(slot as u32 + 1, &msg1, &self.macs, fresh.as_ref());
        Some(Box::new(InFlight {
            hs,
            init,
            created_ms: now_ms,
            timeouts: 0,
        }))
    }

    /// Computes the next login's initiation of up to [`PREPARE_BUDGET`] clients.
    fn prepare(&mut self, now_ms: u32) {
        let mut n = 0;
        while n < PREPARE_BUDGET && self.prep_cursor < self.clients.len() {
            let slot = self.prep_cursor;
            self.prep_cursor += 1;
            n += 1;
            if let Some(f) = self.initiation(slot, now_ms) {
                self.clients[slot].prepared = Some(f);
                self.shared
                    .counters
                    .prepared
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sends a kept initiation again (after a `Busy`), if it is still fresh.
    fn resend_handshake(&mut self, slot: usize, now_ms: u32) -> bool {
        let Some(f) = self.clients[slot].hs.as_ref() else {
            return false;
        };
        if now_ms.saturating_sub(f.created_ms) > INIT_REUSE_MS {
            return false;
        }
        let out = f.init.clone();
        self.sent_mac1
            .insert(slot as u32 + 1, cookie::mac1_of(&out));
        self.send(out);
        self.shared.counters.resent.fetch_add(1, Ordering::Relaxed);
        self.handshake_sent(slot, now_ms);
        true
    }

    /// Bookkeeping of an initiation just sent.
    fn handshake_sent(&mut self, slot: usize, now_ms: u32) {
        let now_us = self.now_us() as u32;
        let c = &mut self.clients[slot];
        if c.state != HANDSHAKING {
            self.inflight += 1;
        }
        c.state = HANDSHAKING;
        c.sent_us = now_us;
        c.hs_deadline = now_ms + HANDSHAKE_TIMEOUT_MS;
        let attempt = c.attempt as u64;
        self.shared
            .counters
            .handshakes
            .fetch_add(1, Ordering::Relaxed);
        self.shared
            .counters
            .max_attempt
            .fetch_max(attempt + 1, Ordering::Relaxed);
        self.hs_started += 1;
        self.arm(slot as u32, now_ms + HANDSHAKE_TIMEOUT_MS);
    }

    /// Ends a client's session (it stays in the shard) and schedules a new login after
    /// `delay_ms`.
    fn drop_session(&mut self, slot: usize, now_ms: u32, delay_ms: u32) {
        let c = &mut self.clients[slot];
        if c.state == ONLINE {
            self.shared.counters.online.fetch_sub(1, Ordering::Relaxed);
            self.by_remote.remove(&c.remote);
        }
        if c.state == HANDSHAKING {
            self.inflight = self.inflight.saturating_sub(1);
        }
        c.transport = None;
        c.hs = None;
        c.req_id = 0;
        c.flags &= !F_KA;
        c.state = BACKOFF;
        c.hs_deadline = now_ms + delay_ms;
        self.arm(slot as u32, now_ms + delay_ms);
    }

    /// Handles a wheel entry that came due. Returns false when out of handshake budget.
    fn act(&mut self, slot: usize, now_ms: u32) -> bool {
        let dl = Self::deadline(&self.clients[slot]);
        if dl == NONE {
            return true;
        }
        if dl > now_ms {
            self.arm(slot as u32, dl);
            return true;
        }
        match self.clients[slot].state {
            HANDSHAKING => {
                self.shared
                    .counters
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                self.inflight = self.inflight.saturating_sub(1);
                let c = &mut self.clients[slot];
                match c.hs.as_mut() {
                    Some(f) if f.timeouts < TIMEOUT_RESENDS => f.timeouts += 1,
                    _ => c.hs = None,
                }
                c.attempt = c.attempt.saturating_add(1);
                let attempt = c.attempt;
                let d = self.backoff_ms(attempt);
                let c = &mut self.clients[slot];
                c.state = BACKOFF;
                c.hs_deadline = now_ms + d;
                self.arm(slot as u32, now_ms + d);
            }
            BACKOFF => {
                if self.hs_started >= HANDSHAKE_BUDGET {
                    return false;
                }
                if !self.resend_handshake(slot, now_ms) {
                    self.start_handshake(slot, now_ms);
                }
            }
            ONLINE => self.online_due(slot, now_ms),
            _ => {}
        }
        true
    }

    fn online_due(&mut self, slot: usize, now_ms: u32) {
        let c = &self.clients[slot];
        if c.req_id != 0 && c.req_retx <= now_ms {
            if c.req_tries >= REQUEST_TRANSMISSIONS {
                // Out of transmissions: like a real client, log in again at once.
                self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                self.drop_session(slot, now_ms, 0);
                return;
            }
            let (id, kind, tries) = (c.req_id, c.req_kind, c.req_tries);
            let frame = self.request_frame(slot, kind, id as u64);
            self.send_frame(slot, &frame);
            self.shared
                .counters
                .retransmissions
                .fetch_add(1, Ordering::Relaxed);
            let c = &mut self.clients[slot];
            c.req_tries = tries + 1;
            c.req_retx = now_ms + (400u32 << tries.min(3)).min(3000);
        }
        let c = &self.clients[slot];
        if c.next_ka <= now_ms {
            if now_ms.wrapping_sub(c.last_rx) > IDLE_EXPIRY_MS {
                self.shared.counters.expired.fetch_add(1, Ordering::Relaxed);
                self.drop_session(slot, now_ms, 0);
                return;
            }
            self.send_frame(slot, &Frame::Keepalive);
            self.shared
                .counters
                .keepalives
                .fetch_add(1, Ordering::Relaxed);
            let now_us = self.now_us() as u32;
            let iv = self.cfg.keepalive.as_millis() as u32;
            let c = &mut self.clients[slot];
            c.ka_us = now_us;
            c.flags |= F_KA;
            c.next_ka = now_ms + iv;
        }
        let dl = Self::deadline(&self.clients[slot]);
        self.arm(slot as u32, dl);
    }

    fn request_frame(&self, slot: usize, kind: u8, id: u64) -> Frame {
        let uid = self.user(slot);
        let n = self.users.len();
        let c = &self.clients[slot];
        let body = match kind {
            k if k == Op::Presence as u8 => Request::SetPresence(if c.flags & F_AWAY != 0 {
                Presence::Away
            } else {
                Presence::Online
            }),
            k if k == Op::Connect as u8 => match partner(uid, n) {
                Some(p) => Request::Connect {
                    user: username(p),
                    candidates: vec![self.local],
                    hard_nat: false,
                },
                None => Request::Search {
                    prefix: username(uid).as_str().to_string(),
                },
            },
            _ => Request::Search {
                prefix: username(partner(uid, n).unwrap_or(uid))
                    .as_str()
                    .to_string(),
            },
        };
        Frame::Request { id, body }
    }

    fn issue(&mut self, kind: Op, now_ms: u32) -> bool {
        for _ in 0..4 {
            if self.clients.is_empty() {
                return false;
            }
            let slot = self.rng.gen_range(0..self.clients.len());
            let c = &mut self.clients[slot];
            if c.state != ONLINE || c.req_id != 0 {
                continue;
            }
            if kind == Op::Presence {
                c.flags ^= F_AWAY;
            }
            c.next_id = c.next_id.wrapping_add(1).max(1);
            let id = c.next_id;
            c.req_id = id;
            c.req_kind = kind as u8;
            c.req_tries = 1;
            c.req_retx = now_ms + 400;
            let frame = self.request_frame(slot, kind as u8, id as u64);
            let now_us = self.now_us() as u32;
            self.clients[slot].sent_us = now_us;
            self.send_frame(slot, &frame);
            self.shared
                .counters
                .requests
                .fetch_add(1, Ordering::Relaxed);
            self.arm(slot as u32, now_ms + 400);
            return true;
        }
        self.shared.counters.skipped.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn on_datagram(&mut self, b: &[u8]) {
        let now_us = self.now_us();
        let now_ms = (now_us / 1000) as u32;
        match Packet::decode(b) {
            Ok(Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            }) => {
                let slot = receiver.wrapping_sub(1) as usize;
                let Some(c) = self.clients.get_mut(slot) else {
                    self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                if c.state != HANDSHAKING {
                    self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let Some(f) = c.hs.take() else { return };
                let done =
                    f.hs.finish(noise)
                        .ok()
                        .filter(|(_, p)| Welcome::decode(p).is_ok());
                self.inflight = self.inflight.saturating_sub(1);
                let Some((t, _)) = done else {
                    // Not the answer to this handshake: try again after a backoff.
                    self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                    let attempt = c.attempt;
                    let d = self.backoff_ms(attempt);
                    let c = &mut self.clients[slot];
                    c.state = BACKOFF;
                    c.hs_deadline = now_ms + d;
                    self.arm(slot as u32, now_ms + d);
                    return;
                };
                let rtt = (now_us as u32).wrapping_sub(c.sent_us) as u64;
                let first = c.flags & F_EVER == 0;
                c.transport = Some(Box::new(t));
                c.remote = sender;
                c.state = ONLINE;
                c.attempt = 0;
                c.next_id = 0;
                c.req_id = 0;
                c.flags |= F_EVER;
                c.last_rx = now_ms;
                let iv = self.cfg.keepalive.as_millis() as u32;
                // Spread first keepalives over the interval, as real logins would be.
                let first_ka = if first {
                    self.rng.gen_range(0..iv.max(1))
                } else {
                    iv
                };
                self.clients[slot].next_ka = now_ms + first_ka;
                self.by_remote.insert(sender, slot as u32);
                self.sent_mac1.remove(&receiver);
                // The supernode holds a session half-open until an authenticated packet
                // arrives on it (and drops it after 10 s): send one now.
                self.send_frame(slot, &Frame::Keepalive);
                self.shared.counters.logins.fetch_add(1, Ordering::Relaxed);
                self.shared.counters.online.fetch_add(1, Ordering::Relaxed);
                self.record(Op::Login, rtt);
                let dl = Self::deadline(&self.clients[slot]);
                self.arm(slot as u32, dl);
            }
            Ok(Packet::Transport {
                receiver,
                counter,
                ciphertext,
            }) => {
                let slot = receiver.wrapping_sub(1) as usize;
                let pt = match self.clients.get_mut(slot) {
                    Some(c) if c.state == ONLINE => {
                        match c.transport.as_mut().map(|t| t.open(counter, ciphertext)) {
                            Some(Ok(pt)) => pt,
                            _ => {
                                self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                        }
                    }
                    _ => {
                        self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                self.clients[slot].last_rx = now_ms;
                match Frame::decode(&pt) {
                    Ok(Frame::Keepalive) => {
                        let c = &mut self.clients[slot];
                        if c.flags & F_KA != 0 {
                            c.flags &= !F_KA;
                            c.flags |= F_ANSWERED;
                            let rtt = (now_us as u32).wrapping_sub(c.ka_us) as u64;
                            self.shared.counters.echoes.fetch_add(1, Ordering::Relaxed);
                            self.record(Op::Keepalive, rtt);
                        }
                    }
                    Ok(Frame::Response { id, body }) => {
                        let c = &mut self.clients[slot];
                        if c.req_id == 0 || id != c.req_id as u64 {
                            return;
                        }
                        c.req_id = 0;
                        c.flags |= F_ANSWERED;
                        let rtt = (now_us as u32).wrapping_sub(c.sent_us) as u64;
                        let op = match c.req_kind {
                            2 => Op::Presence,
                            4 => Op::Connect,
                            _ => Op::Lookup,
                        };
                        let ok = !matches!(body, Response::Error { .. });
                        let counter = if ok {
                            &self.shared.counters.answered_ok
                        } else {
                            &self.shared.counters.answered_err
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        self.record(op, rtt);
                    }
                    Ok(Frame::Request { id, body }) => {
                        let answer = match body {
                            Request::IncomingConnect { .. } => Response::ConnectAnswer {
                                candidates: vec![self.local],
                                hard_nat: false,
                            },
                            _ => Response::Ok,
                        };
                        self.send_frame(slot, &Frame::Response { id, body: answer });
                        self.shared.counters.pushes.fetch_add(1, Ordering::Relaxed);
                    }
                    // A supernode never sends call media.
                    Ok(Frame::Datagram(_)) => {}
                    Ok(Frame::Close) => {
                        self.shared.counters.closes.fetch_add(1, Ordering::Relaxed);
                        let d = self.backoff_ms(0);
                        self.drop_session(slot, now_ms, d);
                    }
                    Err(_) => {
                        self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Packet::CookieReply {
                receiver,
                nonce,
                cookie: sealed,
            }) => {
                // Under load the supernode wants proof that this address receives: keep
                // its cookie for every client on this socket, and retry this one at once.
                let opened = self
                    .sent_mac1
                    .get(&receiver)
                    .and_then(|m| self.macs.open_cookie(&nonce, &sealed, m));
                let slot = receiver.wrapping_sub(1) as usize;
                match opened {
                    Some(c)
                        if self
                            .clients
                            .get(slot)
                            .is_some_and(|c| c.state == HANDSHAKING) =>
                    {
                        self.cookie = Some((c, now_ms));
                        self.shared.counters.cookies.fetch_add(1, Ordering::Relaxed);
                        self.start_handshake(slot, now_ms);
                    }
                    _ => {
                        self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Packet::Reject {
                receiver, reason, ..
            }) => {
                let slot = receiver.wrapping_sub(1) as usize;
                if self
                    .clients
                    .get(slot)
                    .is_none_or(|c| c.state != HANDSHAKING)
                {
                    self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.inflight = self.inflight.saturating_sub(1);
                let busy = matches!(reason, RejectReason::Busy { .. });
                let d = if let RejectReason::Busy { retry_after_ms } = reason {
                    // Told when to come back: not a failure, so no backoff step.
                    self.shared.counters.busy.fetch_add(1, Ordering::Relaxed);
                    let r: u32 = self.rng.gen();
                    peerline_core::client::busy_wait(retry_after_ms, r).as_millis() as u32
                } else {
                    self.shared
                        .counters
                        .rejected
                        .fetch_add(1, Ordering::Relaxed);
                    let c = &mut self.clients[slot];
                    c.attempt = c.attempt.saturating_add(1);
                    let attempt = c.attempt;
                    self.backoff_ms(attempt)
                };
                let c = &mut self.clients[slot];
                if !busy {
                    // Anything but Busy may mean the supernode saw this handshake: the
                    // next attempt is a fresh one.
                    c.hs = None;
                } else if let Some(f) = c.hs.as_mut() {
                    // Busy: the supernode forgot it, so a later timeout may resend it.
                    f.timeouts = 0;
                }
                c.state = BACKOFF;
                c.hs_deadline = now_ms + d;
                self.arm(slot as u32, now_ms + d);
            }
            Ok(Packet::Reset { receiver }) => {
                if let Some(&slot) = self.by_remote.get(&receiver) {
                    self.shared.counters.resets.fetch_add(1, Ordering::Relaxed);
                    self.drop_session(slot as usize, now_ms, 0);
                }
            }
            _ => {
                self.shared.counters.stray.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Timer work: phase changes, new logins, due wheel entries, the request mix.
    fn on_tick(&mut self) {
        let now_us = self.now_us();
        let now_ms = (now_us / 1000) as u32;
        self.hs_started = 0;
        let phase = self.shared.phase.load(Ordering::Relaxed);
        if phase != self.seen_phase {
            self.seen_phase = phase;
            if phase == phase::STORM {
                for slot in 0..self.clients.len() {
                    if self.clients[slot].state != IDLE {
                        self.drop_session(slot, now_ms, 0);
                    }
                }
            }
            self.shared.counters.acks.fetch_add(1, Ordering::Relaxed);
        }
        if phase == phase::PREPARE {
            self.prepare(now_ms);
        }
        if phase == phase::LOGIN {
            while self.inflight < self.window
                && self.cursor < self.clients.len()
                && self.hs_started < HANDSHAKE_BUDGET
            {
                let slot = self.cursor;
                self.cursor += 1;
                self.start_handshake(slot, now_ms);
            }
        }
        self.drain_wheel(now_ms);
        if phase == phase::MIX {
            let dt = (now_us.saturating_sub(self.last_tick_us)) as f64 / 1e6;
            let per = 1.0 / self.shards as f64;
            let rates = [
                self.cfg.presence_rate,
                self.cfg.lookup_rate,
                self.cfg.connect_rate,
            ];
            let ops = [Op::Presence, Op::Lookup, Op::Connect];
            for k in 0..3 {
                self.tokens[k] = (self.tokens[k] + rates[k] * per * dt).min(rates[k] * per + 1.0);
                while self.tokens[k] >= 1.0 {
                    self.tokens[k] -= 1.0;
                    self.issue(ops[k], now_ms);
                }
            }
        }
        self.last_tick_us = now_us;
        self.work(now_ms);
    }

    /// Handles backlog entries within the turn's budget.
    fn work(&mut self, now_ms: u32) {
        let mut n = 0;
        while n < WORK_BUDGET {
            let Some(slot) = self.backlog.pop_front() else {
                break;
            };
            n += 1;
            if !self.act(slot as usize, now_ms) {
                // Out of handshake budget: keep it for the next turn.
                self.backlog.push_front(slot);
                break;
            }
        }
    }

    fn result(mut self) -> ShardResult {
        self.flush_second();
        ShardResult {
            ever_online: self
                .clients
                .iter()
                .filter(|c| c.flags & F_EVER != 0)
                .count(),
            answered: self
                .clients
                .iter()
                .filter(|c| c.flags & F_ANSWERED != 0)
                .count(),
            clients: self.clients.len(),
            hists: self.hists,
        }
    }
}

/// Sends queued datagrams until the socket would block; what is left stays queued.
/// Never waits: on loopback a datagram stays charged to the sender's buffer until the
/// receiver reads it, so a shard that waited to send while the supernode waited to send
/// to it would deadlock both.
fn try_flush(sock: &tokio::net::UdpSocket, target: SocketAddr, out: &mut Vec<Vec<u8>>) {
    let mut sent = 0;
    for b in out.iter() {
        match sock.try_send_to(b, target) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            // Other errors (e.g. ECONNREFUSED from an earlier datagram): drop this one.
            Err(_) => sent += 1,
        }
    }
    out.drain(..sent);
}

async fn run_shard(mut sh: Shard, sock: tokio::net::UdpSocket) -> ShardResult {
    let target = sh.cfg.target;
    let mut buf = vec![0u8; 2048];
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS as u64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        try_flush(&sock, target, &mut sh.out);
        if sh.shared.phase.load(Ordering::Relaxed) == phase::STOP {
            break;
        }
        let blocked = !sh.out.is_empty();
        tokio::select! {
            r = sock.readable() => {
                if r.is_ok() {
                    for _ in 0..1024 {
                        match sock.try_recv_from(&mut buf) {
                            Ok((n, _)) => sh.on_datagram(&buf[..n]),
                            Err(_) => break,
                        }
                    }
                }
                if !sh.backlog.is_empty() {
                    let now_ms = (sh.now_us() / 1000) as u32;
                    sh.work(now_ms);
                }
            }
            _ = sock.writable(), if blocked => {}
            _ = tick.tick() => sh.on_tick(),
        }
    }
    sh.result()
}

/// A running set of simulated clients.
pub struct Engine {
    /// Shared phase, counters and timeline.
    pub shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<ShardResult>>,
    /// Clients simulated.
    pub users: usize,
}

/// Everything the shards measured.
pub struct EngineResult {
    /// Latency by phase and op, merged over shards.
    pub hists: PhaseHists,
    /// Clients that logged in at least once.
    pub ever_online: usize,
    /// Clients that got at least one answer.
    pub answered: usize,
}

impl Engine {
    /// Binds the shards' sockets and starts them in the login phase.
    pub async fn start(cfg: EngineConfig, users: Arc<Users>) -> std::io::Result<Engine> {
        let shards = cfg.shards.clamp(1, users.len().max(1));
        let cfg = Arc::new(EngineConfig { shards, ..cfg });
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(phase::LOGIN),
            counters: Counters::default(),
            timeline: Mutex::new(BTreeMap::new()),
            start: Instant::now(),
        });
        let window = cfg.inflight.div_ceil(shards).max(1);
        let mut seeder = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut tasks = Vec::with_capacity(shards);
        for no in 0..shards {
            let ip = if cfg.target.ip().is_loopback() {
                crate::refserv::source_ip(no)
            } else {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            };
            let sock = tokio::net::UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
            crate::refserv::set_buffers(&sock);
            let local = sock.local_addr()?;
            let count = (users.len() + shards - 1 - no) / shards;
            let clients = (0..count)
                .map(|_| Client {
                    sched: NONE,
                    ..Client::default()
                })
                .collect();
            let sh = Shard {
                no,
                shards,
                cfg: cfg.clone(),
                users: users.clone(),
                shared: shared.clone(),
                local,
                clients,
                by_remote: HashMap::new(),
                wheel: vec![Vec::new(); WHEEL],
                wheel_cur: 0,
                backlog: VecDeque::new(),
                out: Vec::new(),
                rng: rand_chacha::ChaCha8Rng::seed_from_u64(
                    cfg.seed ^ (no as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                ),
                cursor: 0,
                prep_cursor: 0,
                inflight: 0,
                window,
                // A random start spreads low rates over the shards fairly (each shard's
                // share may be far below one request per run).
                tokens: [seeder.gen(), seeder.gen(), seeder.gen()],
                last_tick_us: 0,
                last_hello_ms: 0,
                seen_phase: phase::LOGIN,
                hists: phase_hists(),
                sec: 0,
                sec_hist: small_hist(),
                hs_started: 0,
                macs: MacKeys::new(&cfg.node_key),
                cookie: None,
                sent_mac1: HashMap::new(),
            };
            tasks.push(tokio::spawn(run_shard(sh, sock)));
        }
        Ok(Engine {
            shared,
            tasks,
            users: users.len(),
        })
    }

    /// Moves every shard to `p` and waits until all have seen it.
    pub async fn set_phase(&self, p: u8) {
        self.shared.counters.acks.store(0, Ordering::Relaxed);
        self.shared.phase.store(p, Ordering::Relaxed);
        while self.shared.counters.acks.load(Ordering::Relaxed) < self.tasks.len() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Clients online now.
    pub fn online(&self) -> i64 {
        self.shared.counters.online.load(Ordering::Relaxed)
    }

    /// Stops the shards and merges what they measured.
    pub async fn stop(self) -> EngineResult {
        self.shared.phase.store(phase::STOP, Ordering::Relaxed);
        let mut hists = phase_hists();
        let (mut ever_online, mut answered) = (0, 0);
        for t in self.tasks {
            if let Ok(r) = t.await {
                for (p, ops) in r.hists.iter().enumerate() {
                    for (o, h) in ops.iter().enumerate() {
                        let _ = hists[p][o].add(h);
                    }
                }
                ever_online += r.ever_online;
                answered += r.answered;
            }
        }
        EngineResult {
            hists,
            ever_online,
            answered,
        }
    }
}

/// One shard with no socket, for feeding it arbitrary datagrams (fuzzing and property
/// tests): client 0 holds a real session with a responder that plays the supernode,
/// client 1 has a handshake in flight. Nothing the network sends may panic it.
pub struct DatagramProbe {
    shard: Shard,
    /// The supernode side of client 0's session, to make valid packets.
    pub server: Transport,
    /// The supernode's index of client 0's session.
    pub server_index: u32,
}

impl DatagramProbe {
    /// Sets up the two clients.
    pub fn new() -> DatagramProbe {
        use peerline_crypto::noise::Responder;
        use rand_chacha::rand_core::SeedableRng as _;
        let node =
            peerline_crypto::DeviceKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1));
        let auth =
            peerline_crypto::Authority::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(2));
        let users = Arc::new(Users::issue(&auth, 2, 3, 1_000_000, 1));
        let target: SocketAddr = ([127, 0, 0, 1], 9).into();
        let cfg = Arc::new(EngineConfig {
            target,
            node_key: node.noise_public(),
            shards: 1,
            inflight: 2,
            keepalive: Duration::from_secs(25),
            presence_rate: 0.0,
            lookup_rate: 0.0,
            connect_rate: 0.0,
            seed: 4,
        });
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(phase::LOGIN),
            counters: Counters::default(),
            timeline: Mutex::new(BTreeMap::new()),
            start: Instant::now(),
        });
        let mut shard = Shard {
            no: 0,
            shards: 1,
            cfg,
            users,
            shared,
            local: target,
            clients: (0..2)
                .map(|_| Client {
                    sched: NONE,
                    ..Client::default()
                })
                .collect(),
            by_remote: HashMap::new(),
            wheel: vec![Vec::new(); WHEEL],
            wheel_cur: 0,
            backlog: VecDeque::new(),
            out: Vec::new(),
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(5),
            cursor: 2,
            prep_cursor: 0,
            inflight: 0,
            window: 2,
            tokens: [0.0; 3],
            last_tick_us: 0,
            last_hello_ms: 0,
            seen_phase: phase::LOGIN,
            hists: phase_hists(),
            sec: 0,
            sec_hist: small_hist(),
            hs_started: 0,
            macs: MacKeys::new(&node.noise_public()),
            cookie: None,
            sent_mac1: HashMap::new(),
        };
        shard.start_handshake(0, 0);
        shard.start_handshake(1, 0);
        // Answer client 0's handshake as the supernode would.
        let init = shard.out.remove(0);
        let server_index = 77;
        let mut server = None;
        if let Ok(Packet::HandshakeInit { sender, noise, .. }) = Packet::decode(&init) {
            if let Ok(r) = Responder::read(&node.noise_private(), [6; 32], noise) {
                let w = Welcome {
                    version: PROTOCOL_VERSION,
                    unix_ms: 1,
                    cert: None,
                };
                if let Ok((t, msg2)) = w
                    .encode()
                    .map_err(|_| ())
                    .and_then(|p| r.accept(&p).map_err(|_| ()))
                {
                    let mut out = Vec::new();
                    Packet::HandshakeResponse {
                        sender: server_index,
                        receiver: sender,
                        noise: &msg2,
                    }
                    .encode(&mut out);
                    shard.on_datagram(&out);
                    server = Some(t);
                }
            }
        }
        #[allow(clippy::expect_used)]
        let server = server.expect("the probe's own handshake completes");
        shard.out.clear();
        DatagramProbe {
            shard,
            server,
            server_index,
        }
    }

    /// Feeds one datagram as if it came from the supernode.
    pub fn feed(&mut self, datagram: &[u8]) {
        self.shard.on_datagram(datagram);
        self.shard.out.clear();
        let now_ms = (self.shard.now_us() / 1000) as u32;
        self.shard.work(now_ms);
    }

    /// Clients online.
    pub fn online(&self) -> i64 {
        self.shard.shared.counters.online.load(Ordering::Relaxed)
    }

    /// A transport packet carrying `frame` on client 0's session.
    pub fn seal(&mut self, frame: &Frame) -> Vec<u8> {
        let mut out = vec![0u8; 16];
        let pt = frame.encode().unwrap_or_default();
        let c = self.server.seal(&pt, &mut out).unwrap_or(0);
        out[..16].copy_from_slice(&Packet::transport_header(1, c));
        out
    }

    /// Datagrams the clients sent in answer to the last feed (then cleared).
    pub fn answers(&self) -> usize {
        self.shard.shared.counters.pushes.load(Ordering::Relaxed) as usize
    }
}

impl Default for DatagramProbe {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn a_probe_client_logs_in_answers_pushes_and_follows_resets() {
        let mut p = DatagramProbe::new();
        assert_eq!(p.online(), 1);
        let push = Frame::Request {
            id: 1,
            body: Request::PresenceEvent {
                user: username(1),
                presence: Presence::Away,
            },
        };
        let d = p.seal(&push);
        p.feed(&d);
        assert_eq!(p.answers(), 1);
        // A replay of the same packet is dropped by the replay window.
        p.feed(&d);
        assert_eq!(p.answers(), 1);
        let mut reset = Vec::new();
        Packet::Reset {
            receiver: p.server_index,
        }
        .encode(&mut reset);
        p.feed(&reset);
        assert_eq!(p.online(), 0, "a reset for our session drops it");
    }

    fn reject(receiver: u32, reason: RejectReason) -> Vec<u8> {
        let mut b = Vec::new();
        Packet::Reject {
            receiver,
            reason,
            version: PROTOCOL_VERSION,
        }
        .encode(&mut b);
        b
    }

    #[test]
    fn a_busy_client_waits_the_hint_plus_jitter_without_a_backoff_step() {
        let mut p = DatagramProbe::new();
        // Client 1 (index 2) has its handshake in flight.
        assert_eq!(p.shard.clients[1].state, HANDSHAKING);
        let before = (p.shard.now_us() / 1000) as u32;
        p.feed(&reject(
            2,
            RejectReason::Busy {
                retry_after_ms: 4000,
            },
        ));
        let after = (p.shard.now_us() / 1000) as u32;
        let c = &p.shard.clients[1];
        assert_eq!(c.state, BACKOFF);
        assert_eq!(c.attempt, 0, "a Busy is not a failure");
        assert!(c.hs_deadline >= before + 4000 && c.hs_deadline <= after + 6000);
        assert_eq!(p.shard.inflight, 0);
        let counters = &p.shard.shared.counters;
        assert_eq!(counters.busy.load(Ordering::Relaxed), 1);
        // A second one for a handshake no longer in flight is stray.
        p.feed(&reject(
            2,
            RejectReason::Busy {
                retry_after_ms: 4000,
            },
        ));
        assert_eq!(p.shard.shared.counters.busy.load(Ordering::Relaxed), 1);
        assert_eq!(p.shard.shared.counters.stray.load(Ordering::Relaxed), 1);
    }

    /// After a Busy the client sends the very same initiation again (the supernode did not
    /// process it): no new key exchange; once it is too old, a fresh handshake instead.
    #[test]
    fn a_busy_initiation_is_sent_again_unchanged_while_fresh() {
        let mut p = DatagramProbe::new();
        let kept = p.shard.clients[1].hs.as_ref().unwrap().init.clone();
        p.feed(&reject(
            2,
            RejectReason::Busy {
                retry_after_ms: 1000,
            },
        ));
        let due = p.shard.clients[1].hs_deadline;
        p.shard.out.clear();
        assert!(p.shard.act(1, due));
        assert_eq!(p.shard.clients[1].state, HANDSHAKING);
        assert_eq!(p.shard.out, vec![kept.clone()], "the same datagram again");
        assert_eq!(p.shard.shared.counters.resent.load(Ordering::Relaxed), 1);
        // Told Busy again, and this time the retry comes after the reuse limit.
        p.feed(&reject(
            2,
            RejectReason::Busy {
                retry_after_ms: 1000,
            },
        ));
        let created = p.shard.clients[1].hs.as_ref().unwrap().created_ms;
        let late = created + INIT_REUSE_MS + 1;
        p.shard.clients[1].hs_deadline = late;
        p.shard.out.clear();
        assert!(p.shard.act(1, late));
        assert_eq!(p.shard.out.len(), 1);
        assert_ne!(p.shard.out[0], kept, "a fresh handshake");
        assert_eq!(p.shard.shared.counters.resent.load(Ordering::Relaxed), 1);
    }

    /// Ahead of a storm each client computes its next initiation; the storm then sends
    /// exactly that datagram, once, and a stale one is replaced by a fresh handshake.
    #[test]
    fn a_prepared_initiation_is_what_the_storm_sends() {
        let mut p = DatagramProbe::new();
        p.shard.prepare(0);
        assert_eq!(p.shard.shared.counters.prepared.load(Ordering::Relaxed), 2);
        let ready = p.shard.clients[0].prepared.as_ref().unwrap().init.clone();
        p.shard.out.clear();
        p.shard.drop_session(0, 10, 0);
        assert!(p.shard.act(0, 10));
        assert_eq!(p.shard.out, vec![ready.clone()]);
        assert!(p.shard.clients[0].prepared.is_none(), "used once");
        // Client 1's was prepared too long before its turn.
        let late = INIT_REUSE_MS + 1;
        let stale = p.shard.clients[1].prepared.as_ref().unwrap().init.clone();
        p.shard.out.clear();
        p.shard.drop_session(1, late, 0);
        assert!(p.shard.act(1, late));
        assert_eq!(p.shard.out.len(), 1);
        assert_ne!(p.shard.out[0], stale, "a fresh handshake");
        assert_ne!(p.shard.out[0], ready);
    }

    /// A timed-out initiation goes out again unchanged (the kernel may have dropped it
    /// unseen), up to [`TIMEOUT_RESENDS`] times; then the next one is a fresh handshake.
    #[test]
    fn a_timed_out_initiation_is_resent_unchanged_then_replaced() {
        let mut p = DatagramProbe::new();
        let first = p.shard.clients[1].hs.as_ref().unwrap().init.clone();
        let mut now = p.shard.clients[1].hs_deadline;
        let mut sent = Vec::new();
        for _ in 0..=TIMEOUT_RESENDS {
            assert!(p.shard.act(1, now), "the timeout");
            assert_eq!(p.shard.clients[1].state, BACKOFF);
            now = p.shard.clients[1].hs_deadline;
            p.shard.out.clear();
            assert!(p.shard.act(1, now), "the retry");
            assert_eq!(p.shard.out.len(), 1);
            sent.push(p.shard.out[0].clone());
            now = p.shard.clients[1].hs_deadline;
        }
        let n = TIMEOUT_RESENDS as usize;
        assert!(sent[..n].iter().all(|s| *s == first), "resent unchanged");
        assert_ne!(sent[n], first, "a fresh handshake after that");
        let c = &p.shard.shared.counters;
        assert_eq!(c.handshake_timeouts.load(Ordering::Relaxed), n as u64 + 1);
        assert_eq!(c.resent.load(Ordering::Relaxed), n as u64);
        assert_eq!(
            p.shard.clients[1].attempt,
            n as u8 + 1,
            "timeouts still back off"
        );
    }

    #[test]
    fn another_reject_backs_off_as_a_failure() {
        let mut p = DatagramProbe::new();
        p.feed(&reject(2, RejectReason::RateLimited));
        let c = &p.shard.clients[1];
        assert_eq!(c.state, BACKOFF);
        assert_eq!(c.attempt, 1);
        assert_eq!(p.shard.shared.counters.rejected.load(Ordering::Relaxed), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic_a_shard(data in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let mut p = DatagramProbe::new();
            p.feed(&data);
            prop_assert!(p.online() <= 1);
        }

        #[test]
        fn arbitrary_packets_with_valid_headers_never_panic(ty in 0x81u8..=0x87, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut p = DatagramProbe::new();
            let mut d = vec![ty, PROTOCOL_VERSION, 0, 0];
            d.extend_from_slice(&body);
            p.feed(&d);
            prop_assert!(p.online() <= 2);
        }
    }

    #[test]
    fn a_client_record_stays_compact() {
        assert!(
            std::mem::size_of::<Client>() <= 72,
            "{}",
            std::mem::size_of::<Client>()
        );
    }
}
